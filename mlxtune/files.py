"""Atomic file and directory writes: a crash at any moment leaves the user's old files intact.

Everything mlxtune writes goes to a temporary sibling first and is renamed into place at the end.
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
