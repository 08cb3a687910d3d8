"""One writer per output folder: a live run's folder is refused, a dead run's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qk_subspace.experiment.lock import LOCK_NAME, FolderLock, FolderLockedError
from qk_subspace.experiment.store import ResultsStore

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

HOLD = """
import sys, time
from qk_subspace.experiment.lock import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_is_refused_by_name_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderLockedError, match=f"pid {proc.pid}"):
            ResultsStore.open(tmp_path / "exp6_m.json", {"model": "m"})
        assert not (tmp_path / "exp6_m.json").exists()  # nothing written, nothing checked
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # dies holding the lock: the file stays, the flock goes
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()
    with ResultsStore.open(tmp_path / "exp6_m.json", {"model": "m"}) as store:
        assert store.lock is not None and store.lock.held
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
        store.save()
    assert not (tmp_path / LOCK_NAME).exists()  # released and removed on close


def test_refusals_release_the_lock(tmp_path: Path) -> None:
    (tmp_path / "exp6_m.json").write_text("{}")
    with pytest.raises(FileExistsError):
        ResultsStore.open(tmp_path / "exp6_m.json", {"model": "m"})
    lock = FolderLock(tmp_path).acquire()  # free again
    assert lock.held
    lock.release()
    lock.release()  # twice is fine
    assert not lock.held


def test_two_runs_started_together_one_wins(tmp_path: Path) -> None:
    procs = [_holder(tmp_path / "out")]
    try:
        t0 = time.perf_counter()
        with pytest.raises(FolderLockedError, match="in use by a live run"):
            FolderLock(tmp_path / "out").acquire()
        assert time.perf_counter() - t0 < 5  # refuses at once, never waits
    finally:
        for p in procs:
            p.kill()
            p.wait()
