"""SIGKILL at random points of ``edgelora export`` and ``edgelora add-adapter``: the package is the old one,
intact, or the new one, complete; never half of one, never gone.

Each run is a real ``edgelora`` process. A Python audit hook counts the file operations it makes under
the test's folder (opens, mkdir, rename, link, rmtree, ...) and the process SIGKILLs itself just before
the N-th, N random per seed and stratified over the command's whole run, so the kills land on the
moments that matter (between two renames) instead of wherever a timer happens to fall. One more run
per command is killed at its first ``shutil.rmtree``: after the swap, before the old copy is deleted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgelora.format.fileio import sha256_file
from edgelora.format.manifest import load_manifest

KILLER = r"""
import atexit, os, signal, sys
root, at = os.path.join(sys.argv[1], ""), sys.argv[2]
EVENTS = {"open", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink",
          "os.truncate", "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "tempfile.mkstemp",
          "tempfile.mkdtemp"}
count = 0
def hook(event, args):
    global count
    if event in EVENTS and any(isinstance(a, (str, bytes, os.PathLike)) and os.fsdecode(a).startswith(root)
                               for a in args):
        count += 1
        if str(count) == at or event == at:
            os.kill(os.getpid(), signal.SIGKILL)
atexit.register(lambda: print(f"file operations: {count}", file=sys.stderr))
sys.addaudithook(hook)
from edgelora.cli import main
sys.argv = ["edgelora", *sys.argv[3:]]
main()
"""
TEMP = re.compile(r"^\.pkg\.\d+\.[^/]*\.tmp$")
TIMEOUT = 600
AFTER_SWAP = "shutil.rmtree"


def start(root: Path, kill_at: int | str, *args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", KILLER, str(root), str(kill_at), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def operations(process: subprocess.Popen) -> int:
    """The number of file operations of a run that completed."""
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err
    return int(re.search(r"file operations: (\d+)", err)[1])


def kill_points(total: int, seeds: int) -> list[int]:
    """One random point per seed, each in its own stretch of the run, so together they span all of it."""
    return [random.Random(seed).randint(1 + seed * total // seeds, max(1 + seed * total // seeds,
                                                                       (seed + 1) * total // seeds))
            for seed in range(seeds)]


def snapshot(package: Path) -> dict[str, str] | None:
    if not package.exists():
        return None
    return {str(p.relative_to(package)): sha256_file(p) for p in sorted(package.rglob("*")) if p.is_file()}


def assert_complete(package: Path, adapter: str) -> None:
    """A whole package: every file the manifest names matches it, the new adapter runs, nothing else lies inside."""
    from edgelora.runtime import EdgeModel

    manifest = load_manifest(package)
    assert adapter in manifest.adapters
    expected = {"edgelora.json", manifest.graph["file"], manifest.graph["file"] + ".data"}
    for name, entry in manifest.adapters.items():
        blob = package / entry.file
        assert blob.stat().st_size == entry.bytes and sha256_file(blob) == entry.sha256, name
        sidecar = json.loads((package / f"adapters/{name}.json").read_text())
        assert sidecar["sha256"] == entry.sha256 and sidecar["base_fingerprint"] == manifest.base_fingerprint
        expected |= {entry.file, f"adapters/{name}.json"}
    stray = {f for f in snapshot(package) if f not in expected and not f.startswith("tokenizer")}
    assert not stray, stray
    assert np.isfinite(EdgeModel.open(package).logits([[1, 5, 9]], adapter=adapter)).all()


def check_outcome(run_dir: Path, process: subprocess.Popen, old: dict | None, adapter: str) -> str:
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode in (0, -signal.SIGKILL), err
    package = run_dir / "pkg"
    leftovers = [p.name for p in run_dir.iterdir() if p.name != "pkg"]
    assert all(TEMP.match(n) for n in leftovers), leftovers
    state = snapshot(package)
    if state is None:
        assert old is None, f"the old package is gone ({err})"
        return "absent"
    if state == old:
        assert process.returncode != 0
        return "old"
    assert_complete(package, adapter)
    return "new"


def copy_package(src: Path, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    shutil.copytree(src, run_dir / "pkg")
    return run_dir / "pkg"


def test_add_adapter_killed_anywhere_leaves_old_or_new(llama, tmp_path):
    """A new name and ``--overwrite`` of an existing one; the next write clears what killed runs left."""
    from edgelora.exporters.add_adapter import add_adapter

    first = copy_package(llama.package, tmp_path / "first")
    total = operations(start(tmp_path / "first", 0, "add-adapter", first, f"x={llama.adapter_dirs['plain']}"))
    old = snapshot(first)
    runs = []
    for i, at in enumerate([*kill_points(total, seeds=2), AFTER_SWAP]):
        name, extra = ("x", ["--overwrite"]) if i % 2 == 0 else ("y", [])
        run_dir = tmp_path / f"seed{i}"
        package = copy_package(first, run_dir)
        args = ["add-adapter", package, f"{name}={llama.adapter_dirs['rs']}", *extra]
        runs.append((run_dir, name, start(run_dir, at, *args)))
    outcomes = [check_outcome(run_dir, process, old, name) for run_dir, name, process in runs]
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    for run_dir, _, _ in runs:
        add_adapter(run_dir / "pkg", "z", llama.adapter_dirs["plain"])
        assert [p.name for p in run_dir.iterdir()] == ["pkg"]


def test_export_killed_anywhere_leaves_old_or_new(llama, tmp_path):
    """``export --overwrite`` killed at a random point of a run like it, and right after the swap."""
    old = snapshot(llama.package)

    def export_args(run_dir: Path) -> list:
        return ["export", llama.base_dir, "--adapter", f"a={llama.adapter_dirs['plain']}", "--out", run_dir / "pkg",
                "--overwrite", "--quiet"]

    copy_package(llama.package, tmp_path / "whole")
    total = operations(start(tmp_path / "whole", 0, *export_args(tmp_path / "whole")))
    runs = []
    for i, at in enumerate([*kill_points(total, seeds=1), AFTER_SWAP]):
        run_dir = tmp_path / f"seed{i}"
        copy_package(llama.package, run_dir)
        runs.append((run_dir, start(run_dir, at, *export_args(run_dir))))
    outcomes = [check_outcome(run_dir, process, old, "a") for run_dir, process in runs]
    assert outcomes[-1] == "new", outcomes
