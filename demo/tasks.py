"""The demo's data: generic sequence skills for pretraining the base, and tenant tasks it must not know.

Every example is ``{"prompt": INPUT + "=", "completion": OUTPUT}``. The base is pretrained to copy an
untagged input and to apply a few primitives (upper-casing letters, reversing, shifting and sorting
*digits*) only when the input starts with a tag character. Tenant prompts carry no tag and use
letters or dates, so the base answers them with a copy, which is never right: each tenant generator
drops inputs whose answer equals the input. A tenant's LoRA adapter has to learn its own mapping.

``python -m edgelora.demo.tasks OUT_DIR`` writes ``TASK.train.jsonl`` and ``TASK.test.jsonl``.
"""

from __future__ import annotations

import json
import random
import string
import sys
from collections.abc import Callable
from pathlib import Path

SEP = "="
LETTERS = string.ascii_lowercase


def _letters(rng: random.Random, lo: int = 4, hi: int = 8) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(lo, hi)))


def _caesar(text: str, shift: int = 3) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + shift) % 26] for c in text)


def _date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}"


# tenant name -> (what it does, rng -> (input, output))
TENANTS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "reverse": ("reverse the letters", lambda rng: (w := _letters(rng), w[::-1])),
    "caesar": ("Caesar shift by 3", lambda rng: (w := _letters(rng), _caesar(w))),
    "sort": ("sort the letters", lambda rng: (w := _letters(rng), "".join(sorted(w)))),
    "date": ("YYYY-MM-DD to DD/MM/YYYY", _date),
}

def _symbols(rng: random.Random) -> str:
    """Digits or capitals: the tagged primitives never see the tenants' lowercase letters."""
    return _digits(rng) if rng.random() < 0.5 else _letters(rng, 3, 8).upper()


def _shift(text: str) -> str:
    return "".join(str((int(c) + 1) % 10) if c.isdigit() else chr((ord(c) - 64) % 26 + 65) for c in text)


# pretraining skills: the untagged copy, and tagged primitives on other inputs than the tenants'
GENERIC: list[Callable[[random.Random], tuple[str, str]]] = [
    lambda rng: (w := _letters(rng, 1, 10), w),
    lambda rng: (w := _digits(rng, 1, 10), w),
    lambda rng: (w := "".join(rng.choice(LETTERS + string.digits + "-/.:") for _ in range(rng.randint(3, 10))), w),
    lambda rng: ("^" + (w := _letters(rng, 1, 10)), w.upper()),
    lambda rng: ("~" + (w := _symbols(rng)), w[::-1]),
    lambda rng: ("+" + (w := _symbols(rng)), _shift(w)),
    lambda rng: ("<" + (w := _symbols(rng)), "".join(sorted(w))),
]


def example(inp: str, out: str) -> dict:
    return {"prompt": inp + SEP, "completion": out}


def tenant_split(task: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out test sets with disjoint inputs; inputs the base's copy would answer are skipped."""
    make = TENANTS[task][1]
    rng = random.Random(f"{task}:{seed}")
    seen: dict[str, str] = {}
    while len(seen) < n_train + n_test:
        inp, out = make(rng)
        if inp != out:
            seen.setdefault(inp, out)
    pairs = [example(i, o) for i, o in seen.items()]
    return pairs[:n_train], pairs[n_train:]


def generic_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"generic:{seed}")
    return [example(*rng.choice(GENERIC)(rng)) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from edgelora.format.fileio import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_tenant_data(out_dir: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """task -> (train file, test file) under ``out_dir``."""
    files = {}
    for task in TENANTS:
        train, test = tenant_split(task, n_train, n_test, seed)
        files[task] = (out_dir / f"{task}.train.jsonl", out_dir / f"{task}.test.jsonl")
        write_jsonl(files[task][0], train)
        write_jsonl(files[task][1], test)
    return files


if __name__ == "__main__":
    for task, (train, test) in write_tenant_data(Path(sys.argv[1] if len(sys.argv) > 1 else "."), 2000, 200).items():
        print(f"{task}: {train}, {test}")
