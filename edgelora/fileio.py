"""Files written so that a crash leaves the old state or nothing, and names that cannot escape a folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgeLoraError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str = "adapter name") -> str:
    """Names become file names inside the package: no separators, no '..', no NUL, no leading dot."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise EdgeLoraError(
            f"{what} {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return name


def read_json_object(path: Path, missing: str) -> dict:
    """A JSON object from ``path``; a missing file, bad JSON or a non-object each end in one line naming it."""
    if not path.is_file():
        raise EdgeLoraError(f"{path}: {missing}")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeLoraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise EdgeLoraError(f"{path}: expected a JSON object")
    return raw


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``target``; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False):
    """Build a directory under a temporary name and swap it in whole at the end.

    An existing target is refused unless ``overwrite``; then it is moved aside first and only
    deleted once the new one is in place, so a crash leaves one complete package or the other.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise EdgeLoraError(f"{target}: already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
