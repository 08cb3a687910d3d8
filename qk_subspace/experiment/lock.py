"""One writer per output folder: an exclusive lock held while a run writes its results there.

Two runs into one ``--out`` at the same moment would both finish and the last to write would win; a
``--resume`` or ``--overwrite`` while another run is alive has the same race. :class:`FolderLock` takes an
exclusive ``flock`` on ``<folder>/.qk_subspace.lock`` (holding the owner's pid and command line) before the
results file is checked or written; a second run refuses with :class:`FolderLockedError` naming the process
that holds it. The operating system releases the lock when its process dies, so a lock left by a killed run
is simply taken over (its file is rewritten with the new owner). The lock file is removed on release.
A model series holds its folder once for all its runs (:func:`shared_folder`): the runs of that series,
also in parallel threads, join it. Platforms without ``fcntl`` run unlocked.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderLock", "FolderLockedError", "shared_folder"]

LOCK_NAME = ".qk_subspace.lock"
#: Folders held by :func:`shared_folder` in this process, which runs of this process join.
_SHARED: dict[Path, FolderLock] = {}
_GUARD = threading.Lock()


class FolderLockedError(RuntimeError):
    """Another live process holds the output folder."""


class FolderLock:
    """Exclusive lock on an output folder (see the module docstring); a context manager.

    Args:
        folder: the output folder (created if missing).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self._joined = False

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderLockedError` naming its holder (never waits)."""
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _GUARD:
            if self.path.resolve() in _SHARED:  # a series of this process holds it: join
                self._joined = True
                return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderLockedError(
                    f"output folder {str(self.path.parent)!r} is in use by a live run ({holder}); wait for it "
                    "to finish or choose another --out"
                ) from None
            try:  # the holder we waited on may have removed the file: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:400]}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (safe to call twice)."""
        self._joined = False
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._joined

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@contextlib.contextmanager
def shared_folder(folder: str | os.PathLike) -> Iterator[FolderLock]:
    """Hold ``folder``'s lock for several runs of this process (a model series), which join it."""
    lock = FolderLock(folder).acquire()
    key = lock.path.resolve()
    with _GUARD:
        _SHARED[key] = lock
    try:
        yield lock
    finally:
        with _GUARD:
            _SHARED.pop(key, None)
        lock.release()
