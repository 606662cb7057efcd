"""README.md and docs/*.md: every relative link reaches a file (and heading) of the repository, and every
``edgelora COMMAND --option`` shown names an option that command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from edgelora.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|[\s/$])edgelora\s+([a-z][a-z-]*)(.*)")
PARENT_PATH = re.compile(r"(?<![\w./])\.\./[\w./-]*")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def broken_link(page: Path, target: str, root: Path = ROOT) -> str | None:
    """Why ``target`` (a link on ``page``) leads nowhere inside ``root``, or None when it resolves."""
    if re.match(r"[a-z]+:", target):
        return None  # a web address: not ours to check offline
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.is_relative_to(root):
        return "points outside the repository"
    if not file.exists():
        return "no such file"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"no heading #{anchor} in {file.relative_to(root)}"
    return None


def shown_commands(page: Path) -> list[tuple[str, str, list[str]]]:
    """(line, command, its --options) for every ``edgelora COMMAND ...`` in a code block or inline code span;
    a code block line that starts with ``edgelora`` must name a real command, so it counts even when unknown."""
    text = page.read_text()
    found = []
    spans = [(line, True) for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    spans += [(span.strip("`"), False) for span in INLINE_CODE.findall(FENCE.sub("", text))]
    for line, in_block in spans:
        line = line.split(" #")[0].rstrip("\\ ")
        match = COMMAND.search(line)
        if match is None:
            continue
        command, rest = match.groups()
        starts = re.match(r"\s*(\$\s*)?(\S*/)?edgelora\s", line) is not None
        if command not in main.commands and not (in_block and starts):
            continue  # prose such as "edgelora turns ..."
        try:
            words = shlex.split(rest)
        except ValueError:
            words = rest.split()
        options = [m[0] for w in words if (m := re.match(r"--[a-z][a-z0-9-]*", w.strip("[]|'\"")))]
        found.append((line.strip(), command, options))
    return found


def option_names(command: click.Command) -> set[str]:
    return {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


def test_pages_exist():
    assert (ROOT / "README.md").is_file() and len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    bad = [f"{target}: {why}" for target in links(page) if (why := broken_link(page, target))]
    assert not bad, f"{page.name}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_path_shown_leaves_the_repository(page):
    """Links are checked above; a path written out in the text (``../somewhere/FILE.md``) must not lead a
    reader out of the repository either, where a clone has nothing."""
    outside = [path for path in PARENT_PATH.findall(page.read_text())
               if not (page.parent / path).resolve().is_relative_to(ROOT)]
    assert not outside, f"{page.name}: {outside}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_shown_commands_use_real_options(page):
    bad = []
    for line, command, options in shown_commands(page):
        if command not in main.commands:
            bad.append(f"{line!r}: no command {command!r}")
            continue
        known = option_names(main.commands[command])
        bad += [f"{line!r}: {command} has no option {o}" for o in options if o not in known]
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checkers themselves: a missing file, a missing heading and an unknown option are all found."""
    page = tmp_path / "page.md"
    page.write_text("# A `Title`, here\n\n[ok](#a-title-here) [gone](nothing.md) [no](#nope)\n\n"
                    "```\nedgelora export base --out pkg --adapter-type int8\nedgelora nosuch pkg/\n```\n")
    assert anchors(page) == {"a-title-here"}
    why = [broken_link(page, t, tmp_path) for t in links(page)]
    assert why == [None, "no such file", "no heading #nope in page.md"]
    [(_, export, options), (_, nosuch, _)] = shown_commands(page)
    assert export == "export" and "--adapter-type" in options
    assert "--adapter-type" not in option_names(main.commands[export])
    assert nosuch == "nosuch"
    assert PARENT_PATH.findall("see `../elsewhere/NOTES.md`, not docs/../README.md") == ["../elsewhere/NOTES.md"]
