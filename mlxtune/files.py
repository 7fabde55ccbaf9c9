"""Atomic file and directory writes: a crash at any moment leaves the user's old files intact.

Everything mlxtune writes goes to a temporary sibling first and is renamed into place at the end. The data
is flushed to disk (fsync) before the rename and the folder after it: otherwise a power cut soon after a
rename can leave an empty file under the final name on some filesystems.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MlxtuneError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    `suffix` keeps an extension some writers insist on (numpy appends `.npz` otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files; outputs should get the permissions a plain open() would give.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line so that a crash never leaves half of it: one write() of the whole line, then fsync.

    (A torn last line is still possible on power loss; readers skip a line that does not parse.)
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, flag: str = "--force"):
    """Yield a temporary directory beside `path`; move it to `path` when the block succeeds.

    An existing `path` is refused unless `force`; with `force` it is replaced only after the new
    directory is complete, so an interrupted run never leaves a half-written output.
    """
    path = Path(path)
    if path.exists() and not force:
        raise MlxtuneError(f"{path} already exists: choose another output path or pass {flag} to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
    except OSError as e:
        raise MlxtuneError(f"cannot write to {path.parent}: {e.strerror}") from None
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if not f.is_symlink():
                _fsync(f)
        _fsync(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
