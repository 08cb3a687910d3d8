"""Null baselines (``--baselines``): spectrum nulls of the variance curve (one point) and random
K-dimensional subspaces evaluated like the K sweep (one point per K, ``baseline_seeds`` seeds each)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ...decomposition.nulls import spectrum_nulls, summarize_random
from ...evaluation.sweeps import random_subspace_sweep
from ..config import ExperimentConfig
from ..context import RunContext
from ..store import jsonable
from .base import PointLog, Stage

__all__ = ["NullBaselinesStage"]


class NullBaselinesStage(Stage):
    name = "null baselines"
    figures = ("nulls",)

    def enabled(self, cfg: ExperimentConfig) -> bool:
        return cfg.studies.baselines

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        data.setdefault("baselines", {"random_subspace": []})

    def total(self, ctx: RunContext) -> int:
        return 1 + len(ctx.rand_ks)

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        bl = data["baselines"]
        return int("spectrum_nulls" in bl) + len({r["K"] for r in bl["random_subspace"]})

    def sort(self, data: dict[str, Any]) -> None:
        data["baselines"]["random_subspace"].sort(key=lambda r: (r["K"], r["seed"]))

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        bl, c, rep = data["baselines"], ctx.config, ctx.representation
        n_seeds, seed = c.studies.baseline_seeds, c.sweeps.seed
        if "spectrum_nulls" not in bl:
            log.start()
            bl["spectrum_nulls"] = jsonable(
                spectrum_nulls(ctx.model, rep, n_seeds=n_seeds, seed=seed).to_dict("records")
            )
            log.finish("spectrum nulls")
        for K in [k for k in ctx.rand_ks if k not in {int(r["K"]) for r in bl["random_subspace"]}]:
            log.start()
            rand = random_subspace_sweep(
                ctx.model, ctx.tokens, [K], representation=rep, n_seeds=n_seeds, seed=1_000_003 * seed + K,
                baseline=ctx.baseline, **ctx.sweep_options(), executor=ctx.executor,
            )  # fmt: skip
            bl["random_subspace"].extend(jsonable(rand.to_dict("records")))
            log.finish(f"random K={K}")
        rows = bl["random_subspace"]
        bl["summary"] = jsonable(summarize_random(pd.DataFrame(rows)).to_dict("records")) if rows else []
