"""Files written so that a crash leaves the old state or nothing, and names that cannot escape a folder."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path

from edgelora.errors import EdgeLoraError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def check_name(name: str, what: str = "adapter name") -> str:
    """Names become file names inside the package: no separators, no '..', no NUL, no leading dot."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise EdgeLoraError(
            f"{what} {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return name


_PARSERS = {"JSON": (json.loads, json.JSONDecodeError), "TOML": (tomllib.loads, tomllib.TOMLDecodeError)}


def read_object(path: Path, missing: str, kind: str = "JSON") -> dict:
    """A JSON (or TOML) object from ``path``; a missing file, a bad document or a non-object each end in one
    line naming it."""
    parse, error = _PARSERS[kind]
    if not path.is_file():
        raise EdgeLoraError(f"{path}: {missing}")
    try:
        raw = parse(path.read_text())
    except (UnicodeDecodeError, error) as e:
        raise EdgeLoraError(f"{path}: not valid {kind} ({e})") from None
    if not isinstance(raw, dict):
        raise EdgeLoraError(f"{path}: expected a {kind} object")
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or file system cannot."""
    rename = getattr(_LIBC, "renameat2", None)
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder of a new tree, so a power cut after the swap cannot leave empty files in it."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: Path) -> None:
    """Temporary folders of writers that were killed: hidden, ``.tmp``, named after a process that is gone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^/]*\.tmp$")
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def exclusive(directory: str | os.PathLike):
    """Hold an exclusive lock on ``directory`` as it stands at that path, for a read-modify-swap of it.

    Two writers that each start from the same manifest would otherwise each swap in their own
    copy, and the last would drop the other's change. The lock is on the directory itself, not a
    lock file beside it; since a swap puts a new directory at the path, a writer that waited
    checks that the one it locked is still there, and locks the new one if not.
    """
    import fcntl

    path = Path(directory)
    while True:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                yield
                return
        finally:
            os.close(fd)


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, update: bool = False):
    """Build a directory under a temporary name and swap it in whole at the end.

    An existing target is refused unless ``overwrite`` (or ``update``). ``update`` starts from a
    hard-linked copy of the target, so changing a few files of a large package costs only those
    files; this is safe because package files are only ever replaced by rename, never written in
    place. The swap is one atomic exchange where the OS has one (Linux), so a reader or a kill sees
    the old directory or the new one, never neither; elsewhere the old one is renamed aside first
    and kept as ``.NAME.PID.old`` until the new one is in place. Temporary folders
    (``.NAME.PID.*.tmp``) left by killed writers are removed by the next write to the same target.
    """
    target = Path(target)
    if target.exists() and not (overwrite or update):
        raise EdgeLoraError(f"{target}: already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        if update:
            shutil.copytree(target, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        yield tmp
        _fsync_tree(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = target.parent / f".{target.name}.{os.getpid()}.old"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
