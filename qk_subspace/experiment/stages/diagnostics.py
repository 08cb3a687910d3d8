"""Attention diagnostics per K: every head's pattern under the K point's edit vs the original.

The rows are evaluated inside the K sweep's edits (:mod:`.ksweep`) and saved with each K point, so
this stage has no points of its own; it owns the ``attention_diagnostics`` section, adds each head's
output change (:func:`~qk_subspace.evaluation.head_outputs.head_output_change`), and checks K = all.
"""

from __future__ import annotations

from typing import Any

from ...evaluation.head_outputs import head_output_change
from ..config import ExperimentConfig
from ..context import RunContext
from ..store import jsonable
from .base import Stage

__all__ = ["DiagnosticsStage"]


class DiagnosticsStage(Stage):
    name = "attention diagnostics"
    figures = ("diagnostics",)

    def enabled(self, cfg: ExperimentConfig) -> bool:
        return cfg.circuits.diagnostics

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        data.setdefault("attention_diagnostics", {"rows": []})
        data["attention_diagnostics"]["options"] = ctx.side["diagnostics"]

    def sort(self, data: dict[str, Any]) -> None:
        data["attention_diagnostics"]["rows"].sort(key=lambda r: (r["K"], r["layer"], r["head"]))

    def record(self, ctx: RunContext, data: dict[str, Any], K: int, records: list[dict[str, Any]]) -> None:
        """Add the per-head records of point ``K``, with every head's output change under its edit."""
        assert ctx.diag_tokens is not None
        rep, mixing = ctx.representation, ctx.pca.mixing(K=K)
        change = head_output_change(
            ctx.model,
            ctx.diag_tokens,
            lambda: rep.edit(ctx.model, ctx.heads, mixing),
            batch_size=ctx.config.text.batch_size,
            progress=False,
        )
        for rec in records:
            rec["output_change_z"] = float(change["z"][rec["layer"], rec["head"]])
            rec["output_change_write"] = float(change["write"][rec["layer"], rec["head"]])
        data["attention_diagnostics"]["rows"].extend(jsonable(records))

    def checks(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        at_all = [r for r in data["attention_diagnostics"]["rows"] if r["K"] == ctx.n]
        return {
            "diagnostics_k_all": {
                "K": ctx.n,
                "max_kl": max((r["kl"] or 0.0) for r in at_all),
                "max_js": max((r["js"] or 0.0) for r in at_all),
                "min_top1_agreement": min(r["top1_agreement"] for r in at_all),
                "max_output_change_write": max((r["output_change_write"] or 0.0) for r in at_all),
            }
        }
