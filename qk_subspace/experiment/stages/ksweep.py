"""6B: perplexity vs the number of kept components K (one point per K), with the K = all check.

Head-space representations (``qk``, ``ov``) keep the report's row layout; the others add the
``space`` columns (:func:`qk_subspace.evaluation.sweeps.sweep`). With ``--diagnostics`` every K point
also carries the per-head attention diagnostics of its edit (:mod:`.diagnostics`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ...evaluation.sweep import K_ALL_TOLERANCE
from ...evaluation.sweeps import sweep, sweep_k
from ..context import RunContext
from ..store import jsonable
from .base import PointLog, Stage
from .diagnostics import DiagnosticsStage

__all__ = ["KSweepStage"]


class KSweepStage(Stage):
    name = "K sweep"
    figures = ("sweep",)

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        data.setdefault("perplexity_vs_k", [])

    def total(self, ctx: RunContext) -> int:
        return len(ctx.ks)

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        return len(data["perplexity_vs_k"])

    def sort(self, data: dict[str, Any]) -> None:
        data["perplexity_vs_k"].sort(key=lambda r: r["K"])

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        done = {int(r["K"]) for r in data["perplexity_vs_k"]}
        todo = [k for k in ctx.ks if k not in done]
        if not todo:
            return
        c, rep = ctx.config, ctx.representation
        diagnostics = DiagnosticsStage() if c.circuits.diagnostics else None

        def on_row(row: dict[str, Any]) -> None:
            records = row.pop("attention_diagnostics", None)
            if diagnostics is not None and records is not None:  # saved together with this K's point
                diagnostics.record(ctx, data, int(row["K"]), records)
            data["perplexity_vs_k"].append(jsonable(row))
            log.finish(f"K={row['K']}")

        common: dict[str, Any] = {
            "baseline": ctx.baseline,
            "seed": c.sweeps.seed,
            "on_row": on_row,
            **ctx.sweep_options(),
            "executor": ctx.executor,
        }
        log.start()
        if rep.space == "raw":
            sweep_k(
                ctx.model, ctx.pca, ctx.tokens, todo, representation=rep, diagnostics=diagnostics is not None,
                diag_tokens=ctx.diag_tokens,
                diagnostics_options={"head_scores": c.circuits.head_scores} if diagnostics else None, **common,
            )  # fmt: skip
        else:  # inside the representation's context, paired with the (gauge-independent) baseline
            sweep(ctx.model, ctx.tokens, todo, representation=rep, pca=ctx.pca, **common)

    def checks(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        rows, n = data["perplexity_vs_k"], ctx.n
        row = next(r for r in rows if r["K"] == n)
        err = abs(row["ratio"] - 1.0)
        assert ctx.baseline is not None
        k_all = {
            "K": n,
            "ppl": row["ppl"],
            "baseline_ppl": ctx.baseline.ppl,
            "ratio": row["ratio"],
            "abs_ratio_error": err,
            "tolerance": K_ALL_TOLERANCE,
            "ok": err <= K_ALL_TOLERANCE,
        }
        if not k_all["ok"]:
            warnings.warn(
                f"K=all (K={n}) gives perplexity ratio {row['ratio']!r}, not within {K_ALL_TOLERANCE} of 1",
                RuntimeWarning,
                stacklevel=2,
            )
        X = ctx.heads.features
        recon = None
        if X is not None:
            original = torch.from_numpy(X).reshape(ctx.pca.reconstruct(n).shape)
            recon = float((ctx.pca.reconstruct(n).cpu() - original).abs().max())
        clustering = data.get("clustering", {}).get("rows", [])
        return {
            "k_all": k_all,
            "max_injection_residual": {
                "k_sweep": max(r["max_residual"] for r in rows),
                "clustering": max((r["max_residual"] for r in clustering), default=0.0),
            },
            "pca_reconstruction_max_abs_error": recon,
        }
