"""Per-layer PCA (``--groupby layer``): the same K in every layer, and the global PCA at the largest K
with no more stored numbers (:func:`~qk_subspace.decomposition.storage.matched_global_k`)."""

from __future__ import annotations

from typing import Any

from ...evaluation.sweep import K_ALL_TOLERANCE
from ...evaluation.sweeps import sweep
from ..config import ExperimentConfig
from ..context import RunContext
from ..store import jsonable
from .base import PointLog, Stage, k_all_check

__all__ = ["LayerwiseStage"]


class LayerwiseStage(Stage):
    name = "layerwise"
    figures = ("layerwise",)

    def enabled(self, cfg: ExperimentConfig) -> bool:
        return cfg.studies.groupby == "layer"

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        assert ctx.layer_pca is not None
        lw = data.setdefault("layerwise", {"per_layer": [], "global": []})
        D, L = ctx.heads.feature_dim, ctx.model.cfg.n_layers
        lw["parameter_count"] = (
            f"numbers stored, D = {D} per head matrix, n = {ctx.n} heads, L = {L} "
            "layers: per layer L (D + K D) + n K; global D + K D + n K"
        )
        lw["matched"] = [{"K_layer": k, "K_global": ctx.matched[k]} for k in ctx.layer_ks]
        lw["variance"] = {
            "cumulative_variance": ctx.layer_pca.cumulative_variance_.tolist(),
            "explained_variance_ratio": ctx.layer_pca.explained_variance_ratio_.tolist(),
        }

    def total(self, ctx: RunContext) -> int:
        return len(ctx.layer_ks) + len(ctx.glob_ks)

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        return len(data["layerwise"]["per_layer"]) + len(data["layerwise"]["global"])

    def sort(self, data: dict[str, Any]) -> None:
        for key in ("per_layer", "global"):
            data["layerwise"][key].sort(key=lambda r: r["K"])

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        lw = data["layerwise"]
        for key, grid, pca in (("per_layer", ctx.layer_ks, ctx.layer_pca), ("global", ctx.glob_ks, ctx.pca)):
            todo = [k for k in grid if k not in {int(r["K"]) for r in lw[key]}]
            if not todo:
                continue

            def on_row(row: dict[str, Any], key: str = key) -> None:
                lw[key].append(jsonable(row))
                log.finish(f"{'layer' if key == 'per_layer' else 'matched global'} K={row['K']}")

            log.start()
            sweep(
                ctx.model, ctx.tokens, todo, representation=ctx.representation, pca=pca, baseline=ctx.baseline,
                seed=ctx.config.sweeps.seed, on_row=on_row, **ctx.sweep_options(), executor=ctx.executor,
            )  # fmt: skip

    def checks(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        m = int(ctx.model.cfg.n_heads)
        return {"k_all_layerwise": k_all_check(data["layerwise"]["per_layer"], m, K_ALL_TOLERANCE)}
