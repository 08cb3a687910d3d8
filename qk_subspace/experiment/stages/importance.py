"""Components ranked by what the model needs (``--order importance``), and K swept over that order.

The ranking (drop-one or gradient, :func:`~qk_subspace.evaluation.importance.component_importance`) is
one point, measured on tokens the sweep does not use; then one point per K of the same grid.
"""

from __future__ import annotations

from typing import Any

from ...evaluation.importance import component_importance, importance_order
from ...evaluation.sweep import K_ALL_TOLERANCE
from ...evaluation.sweeps import sweep_k
from ..config import ExperimentConfig
from ..context import RunContext
from ..store import jsonable
from .base import PointLog, Stage, k_all_check

__all__ = ["ImportanceStage"]


class ImportanceStage(Stage):
    name = "importance"
    figures = ("importance",)

    def enabled(self, cfg: ExperimentConfig) -> bool:
        return cfg.circuits.order == "importance"

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        data.setdefault("perplexity_vs_k_importance", [])

    def total(self, ctx: RunContext) -> int:
        return 1 + len(ctx.ks)

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        return int("order" in data.get("importance", {})) + len(data["perplexity_vs_k_importance"])

    def sort(self, data: dict[str, Any]) -> None:
        data["perplexity_vs_k_importance"].sort(key=lambda r: r["K"])

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        c, pca, rep = ctx.config, ctx.pca, ctx.representation
        common: dict[str, Any] = {"seed": c.sweeps.seed, **ctx.sweep_options()}
        if "order" not in (data.get("importance") or {}):
            assert ctx.rank_tokens is not None  # checked when the side tokens were prepared
            log.start()
            method = c.circuits.importance_method
            imp = component_importance(
                ctx.model, pca, ctx.rank_tokens, method=method, representation=rep, **common
            )
            data["importance"] = {
                "method": method,
                "circuit": rep.circuit,
                "score": imp.attrs["score"],
                "n_tokens": imp.attrs["n_tokens"],
                "baseline_ppl": imp.attrs.get("baseline_ppl"),
                "order": importance_order(imp),
                "variance_order": list(range(pca.n_components_)),
                "components": jsonable(imp.to_dict("records")),
            }
            log.finish("importance")
        done = {int(r["K"]) for r in data["perplexity_vs_k_importance"]}
        todo = [k for k in ctx.ks if k not in done]
        if not todo:
            return

        def on_row(row: dict[str, Any]) -> None:
            data["perplexity_vs_k_importance"].append(jsonable(row))
            log.finish(f"importance K={row['K']}")

        log.start()
        ranking = list(data["importance"]["order"])
        sweep_k(
            ctx.model, pca, ctx.tokens, todo, baseline=ctx.baseline, on_row=on_row, representation=rep,
            order="importance", importance=ranking, **common,
        )  # fmt: skip

    def checks(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        return {"k_all_importance": k_all_check(data["perplexity_vs_k_importance"], ctx.n, K_ALL_TOLERANCE)}
