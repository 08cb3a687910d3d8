"""The gauge study (``--gauges N``): raw and circuit curves for the model as loaded and under ``N``
random model-preserving gauges (one point); the baseline must not move."""

from __future__ import annotations

from typing import Any

from ...evaluation.gauge_study import gauge_study
from ..config import ExperimentConfig
from ..context import RunContext
from ..store import jsonable
from .base import PointLog, Stage

__all__ = ["GaugeStage"]


class GaugeStage(Stage):
    name = "gauge study"
    figures = ("gauge",)

    def enabled(self, cfg: ExperimentConfig) -> bool:
        return cfg.studies.gauges > 0

    def total(self, ctx: RunContext) -> int:
        return 1

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        return int("gauge_study" in data)

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        if "gauge_study" in data:
            return
        c = ctx.config
        log.start()
        study = gauge_study(
            ctx.model,
            ctx.tokens,
            ctx.ks,
            n_gauges=c.studies.gauges,
            seed=c.sweeps.seed + 1,
            **ctx.sweep_options(),
        )
        data["gauge_study"] = jsonable(study.summary())
        log.finish("gauge study")

    def checks(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        gs = data["gauge_study"]
        return {"gauge_baseline": {"max_rel_change": gs["baseline_max_rel_change"], "ok": gs["baseline_ok"]}}
