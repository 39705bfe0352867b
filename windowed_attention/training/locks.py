"""File locks on a run folder (POSIX `flock`: released by the kernel when the process ends, even by
SIGKILL, so a lock is never left stale; where `fcntl` is missing they do nothing).

- `RunLock` (`.run.lock`): held by the one process that trains into the folder, for the whole run; a
  second run on the same folder is refused at once instead of overwriting the first one's files.
- `publishing` / `reading` (`.checkpoint.lock`): the short exclusive lock a save holds while it moves a
  checkpoint's files into place, and the shared lock a reader holds while it reads them, so that a
  reader sees the previous checkpoint or the new one, never a mix of both.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

RUN_LOCK, FILES_LOCK = ".run.lock", ".checkpoint.lock"


class RunFolderBusy(Exception):
    """Another process is training into this run folder."""


def _open(path: Path, create: bool) -> int | None:
    """A descriptor to lock `path` with, or None (no fcntl; or a reader that can neither open nor create it)."""
    if fcntl is None:
        return None
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if create:
            raise
    try:  # a read-only folder: lock the file if a writer made it
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


class RunLock:
    """The exclusive lock of one training run on `folder` (created if needed); `acquire` raises
    `RunFolderBusy` at once when another process holds it, and OSError when the folder cannot be written."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"the run folder {self.folder} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = _open(self.folder / RUN_LOCK, create=True)
        if fd is None:
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            holder = f" (process {holder})" if holder else ""
            raise RunFolderBusy(f"{self.folder} is in use by another training run{holder}; "
                                "wait for it to end or choose another --out") from None
        except OSError:  # a file system without locks (some network mounts): run unlocked
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def in_use(folder: str | Path) -> bool:
    """Whether a training run holds `folder`'s run lock now (a hint: it may change the next moment)."""
    fd = _open(Path(folder) / RUN_LOCK, create=False) if Path(folder).is_dir() else None
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def _locked(folder: Path, operation_name: str, create: bool):
    fd = _open(folder / FILES_LOCK, create)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, getattr(fcntl, operation_name))
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            pass
        yield
    finally:
        os.close(fd)


def publishing(folder: str | Path):
    """Held while a save moves its files into `folder` (exclusive; waits for readers)."""
    return _locked(Path(folder), "LOCK_EX", create=True)


def reading(folder: str | Path):
    """Held while a reader reads a checkpoint's files in `folder` (shared; waits for a save's moves)."""
    return _locked(Path(folder), "LOCK_SH", create=False)
