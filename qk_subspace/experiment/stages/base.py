"""The stage protocol: one part of a run, its points, its checks, its figures and its report section.

A run is a list of stages (:data:`qk_subspace.experiment.stages.STAGES`). Each stage says when it is
enabled, sets up its sections of the results document (keeping points a resumed run already has),
counts its points, evaluates the missing ones -- handing each finished point to the
:class:`PointLog`, which sorts the sections and saves the file atomically -- and contributes its
checks, its figure families (:mod:`qk_subspace.viz`) and its report sections
(:mod:`qk_subspace.report`). To add a stage: one module with a :class:`Stage` subclass, and its
instance in ``STAGES``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

from ..config import ExperimentConfig
from ..context import RunContext
from ..store import ResultsStore

__all__ = ["PointLog", "Stage", "k_all_check"]


class Stage:
    """One part of a run (subclass it; see the module docstring)."""

    name: ClassVar[str]
    #: figure families of :mod:`qk_subspace.viz` drawn from this stage's sections.
    figures: ClassVar[tuple[str, ...]] = ()

    def enabled(self, cfg: ExperimentConfig) -> bool:
        return True

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        """Create (or refresh) this stage's sections; points already in ``data`` are kept."""

    def total(self, ctx: RunContext) -> int:
        """How many points the stage evaluates in all."""
        return 0

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        """How many of them ``data`` holds."""
        return 0

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        """Evaluate the points ``data`` lacks, calling ``log.finish(key)`` after each."""

    def sort(self, data: dict[str, Any]) -> None:
        """Put this stage's rows in their canonical order (after every point)."""

    def checks(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        """Entries of the ``checks`` section."""
        return {}


class PointLog:
    """Records finished points: timings, the run's list of evaluated points, sorting, status, atomic save."""

    def __init__(
        self, store: ResultsStore, ctx: RunContext, stages: Sequence[Stage], run_entry: dict[str, Any]
    ):
        self.store, self.ctx, self.stages, self.run_entry = store, ctx, list(stages), run_entry
        self.document = store.payload
        self._last = time.perf_counter()

    def start(self) -> None:
        """Start the clock of the next point (work before it is not counted)."""
        self._last = time.perf_counter()

    def status(self) -> dict[str, Any]:
        done = sum(s.done(self.ctx, self.document) for s in self.stages)
        total = sum(s.total(self.ctx) for s in self.stages)
        return {"complete": done == total, "points_done": done, "points_total": total}

    def save(self) -> None:
        self.document["status"] = self.status()
        self.store.save()

    def finish(self, key: str) -> None:
        """A point is done: time it, sort every section, update the status and save."""
        now = time.perf_counter()
        self.document["timings"]["points_s"][key] = now - self._last
        self._last = now
        self.run_entry["evaluated"].append(key)
        for stage in self.stages:
            stage.sort(self.document)
        self.save()


def k_all_check(rows: Sequence[dict[str, Any]], K: int, tolerance: float) -> dict[str, Any]:
    """The K = all check of a sweep's rows: the ratio at ``K`` must be within ``tolerance`` of 1."""
    row = next(r for r in rows if r["K"] == K)
    err = abs(row["ratio"] - 1.0)
    return {
        "K": K,
        "ratio": row["ratio"],
        "abs_ratio_error": err,
        "tolerance": tolerance,
        "ok": err <= tolerance,
    }
