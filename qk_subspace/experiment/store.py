"""The results file of an experiment run: deterministic JSON, atomic writes, and safe resuming.

A run keeps one JSON document (``exp6_<model>.json``) and rewrites it after every finished
evaluation point with :func:`atomic_write_json` (temporary file in the same directory, ``fsync``,
then ``os.replace``), so a crash or ``SIGKILL`` leaves either the previous or the new complete file,
never a torn one. The document is serialised deterministically (fixed key order, ``repr`` floats),
and everything that depends on the clock lives in the ``timings`` section, always written last:
two runs with the same inputs and seeds give byte-identical files up to ``"timings"``.

Resuming (:meth:`ResultsStore.open` with ``resume=True``) loads the file only if its configuration
fingerprint (model, processing, protocol, token hash, grids, seeds, evaluation settings, package
versions) equals the current one; otherwise it raises :class:`ConfigMismatchError` naming every
difference and leaves the file untouched.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lock import FolderLock

__all__ = [
    "SCHEMA_VERSION",
    "TIMINGS_KEY",
    "ConfigMismatchError",
    "ResultsStore",
    "atomic_write_json",
    "dumps_results",
    "fingerprint",
    "jsonable",
    "load_results",
    "without_timings",
]

SCHEMA_VERSION = 1
TIMINGS_KEY = "timings"
#: Top-level sections in the order they are written (others follow in insertion order; timings last).
SECTION_ORDER = (
    "schema_version",
    "status",
    "metadata",
    "variance",
    "baseline",
    "perplexity_vs_k",
    "clustering",
    "pca_map",
    "checks",
    "gate",
)
#: Metadata entries that describe *where* things are, not *what* was computed: not part of the
#: resume check (moving the text file does not invalidate a run; its sha256 is checked instead).
_NOT_FINGERPRINTED = {("protocol", "text_file")}
#: Top-level metadata entries outside the resume check: where the points were evaluated (a run
#: started on Ray may be finished serially, and the other way round; the numbers are the same).
_NOT_FINGERPRINTED_TOP = {"executor"}


class ConfigMismatchError(ValueError):
    """``--resume`` found a results file written with a different configuration."""


def jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples and paths into plain JSON types (recursively)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if not math.isfinite(x):
            return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
        return x
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the results JSON: {obj!r}")


def dumps_results(data: Mapping[str, Any]) -> str:
    """Deterministic serialisation: :data:`SECTION_ORDER` first, then other sections, ``timings`` last."""
    body = {k: data[k] for k in SECTION_ORDER if k in data}
    body.update({k: v for k, v in data.items() if k not in body and k != TIMINGS_KEY})
    if TIMINGS_KEY in data:
        body[TIMINGS_KEY] = data[TIMINGS_KEY]
    return json.dumps(jsonable(body), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def without_timings(text: str) -> str:
    """The serialised document up to its ``timings`` section (what must be byte-identical run to run)."""
    marker = f'\n  "{TIMINGS_KEY}": '
    i = text.rfind(marker)
    return text if i < 0 else text[:i]


def atomic_write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, then ``os.replace``."""
    path = Path(path)
    text = dumps_results(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results JSON written by :func:`atomic_write_json`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a valid results JSON ({exc})") from exc
    if not isinstance(data, dict) or "metadata" not in data:
        raise ValueError(f"{str(path)!r} is not a qk_subspace results file (no 'metadata' section)")
    return data


def fingerprint(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``metadata`` that must match for ``--resume`` (JSON types, paths removed)."""
    fp = copy.deepcopy(jsonable(metadata))
    for key in _NOT_FINGERPRINTED_TOP:
        fp.pop(key, None)
    for section, key in _NOT_FINGERPRINTED:
        if isinstance(fp.get(section), dict):
            fp[section].pop(key, None)
    return fp


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _differences(old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: on disk {old!r}, now {new!r}"]
    return []


class ResultsStore:
    """The results document of one run and its file; every :meth:`save` is atomic.

    Use :meth:`open` to start a new file or resume an existing one.
    """

    def __init__(
        self, path: Path, data: dict[str, Any], resumed: bool, lock: FolderLock | None = None
    ) -> None:
        self.path = path
        self.payload = data
        self.resumed = resumed
        self.lock = lock

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        metadata: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
    ) -> ResultsStore:
        """Start a results document at ``path`` or, with ``resume``, continue the one there.

        The store holds its folder's :class:`~qk_subspace.experiment.lock.FolderLock` until :meth:`close`
        (use it as a context manager).

        Raises:
            FileExistsError: ``path`` exists and neither ``resume`` nor ``overwrite`` is set.
            ConfigMismatchError: ``resume`` and the file on disk has a different configuration.
            FolderLockedError: another live run writes into the same folder.
        """
        path = Path(path)
        lock = FolderLock(path.parent).acquire()
        try:
            return cls._open(path, metadata, lock, resume, overwrite)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open(
        cls, path: Path, metadata: Mapping[str, Any], lock: FolderLock, resume: bool, overwrite: bool
    ) -> ResultsStore:
        meta = jsonable(metadata)
        if path.exists():
            if resume:
                data = load_results(path)
                diffs = _differences(fingerprint(data["metadata"]), fingerprint(meta))
                if diffs:
                    shown = "\n  ".join(diffs[:20]) + ("\n  ..." if len(diffs) > 20 else "")
                    raise ConfigMismatchError(
                        f"--resume: {str(path)!r} was written by a run with a different configuration; "
                        f"refusing to resume or overwrite it. Differences:\n  {shown}\n"
                        "Use the original settings to resume, or another --out directory for a new run."
                    )
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    stale.unlink(missing_ok=True)  # left by a killed writer; the JSON itself is intact
                data["metadata"] = meta  # identical up to non-fingerprinted paths
                return cls(path, data, resumed=True, lock=lock)
            if not overwrite:
                raise FileExistsError(
                    f"{str(path)!r} already exists; pass resume=True (--resume) to continue that run, "
                    "overwrite=True (--overwrite) to replace it, or choose another output directory"
                )
        return cls(path, {"schema_version": SCHEMA_VERSION, "metadata": meta}, resumed=False, lock=lock)

    def save(self) -> None:
        atomic_write_json(self.path, self.payload)

    def close(self) -> None:
        """Release the folder's lock (the file stays as last saved)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
