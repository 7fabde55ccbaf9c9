"""Atomic file and directory writes: a crash at any moment leaves the user's old files intact.

Everything mlxtune writes goes to a temporary sibling first and is renamed into place at the end. The data
is flushed to disk (fsync) before the rename and the folder after it: otherwise a power cut soon after a
rename can leave an empty file under the final name on some filesystems.

A process killed mid-write (SIGKILL, power cut) leaves its temporary sibling behind: its name carries the
writer's process id, and the next write to the same path removes those of processes that are gone (and
puts back a folder that `atomic_dir` had moved aside when the kill came between its two renames). A full
disk (or a file size limit) is one error naming the path, the previous file kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import MlxtuneError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The errors of a write that does not fit: no space, over quota, over the file size limit (RLIMIT_FSIZE).
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of writers of `path` that died mid-write (their process is gone), and put back
    a folder `atomic_dir` had moved aside when it was killed between its two renames. Returns what it removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.tmp")
    removed = []
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        removed.append(entry)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not _old_in_use(path):
        if path.exists():  # the replacement finished: the old copy is garbage
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between moving the old folder aside and moving the new one in
            os.replace(old, path)
        removed.append(old)
    return removed


def _old_in_use(path: Path) -> bool:
    """A live writer of `path` (its temporary exists) may be between its two renames right now."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.tmp")
    return any((m := pattern.match(e.name)) and _alive(int(m.group(1))) for e in path.parent.iterdir())


def _is_full(e: OSError) -> bool:
    # numpy's tofile reports a short write as a plain OSError("N requested and M written"), without errno.
    return e.errno in FULL or (e.errno is None and " requested and " in str(e))


def _full_disk(path: Path, e: OSError) -> MlxtuneError:
    why = f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})" if e.errno else f"a short write ({e})"
    return MlxtuneError(f"cannot write {path}: {why}; nothing was replaced: free some space (or raise the file "
                        "size limit) and run again")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    `suffix` keeps an extension some writers insist on (numpy appends `.npz` otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files; outputs should get the permissions a plain open() would give.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_full(e):
            raise _full_disk(path, e) from None
        raise
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
    clean_leftovers(path)  # first: it may put back the folder a killed run had moved aside
    if path.exists() and not force:
        raise MlxtuneError(f"{path} already exists: choose another output path or pass {flag} to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_full(e):
            raise _full_disk(path, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LOCK_NAME = ".mlxtune.lock"


class FolderLock:
    """An exclusive lock on a folder (fcntl.flock on FOLDER/.mlxtune.lock), so that two runs never write the
    same outputs. The lock file holds the owner's pid for the message; the kernel drops the lock when the
    owner's process ends, however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, folder: str | os.PathLike, what: str, flag: str):
        import fcntl  # POSIX only (macOS and Linux, where MLX and mlxtune run)

        self.fd: int | None = None
        self.file = Path(folder) / LOCK_NAME
        self.created = not self.file.parent.exists()  # then an empty folder is removed again on release
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise MlxtuneError(f"{self.file.parent} is in use by another {what} (pid {owner}): wait for it to "
                                   f"finish, or choose another {flag}") from None
            # The holder before us may have removed the file after we opened it: lock the one on disk.
            try:
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file)
            os.close(self.fd)
            self.fd = None
            if self.created:
                with contextlib.suppress(OSError):  # not empty: the run wrote something
                    os.rmdir(self.file.parent)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def proc_field_bytes(path: str, key: str) -> int | None:
    """A `Key:  N kB` field of a Linux /proc file (/proc/meminfo, /proc/self/status) in bytes; None where the
    file or the field is absent (macOS, Windows)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
