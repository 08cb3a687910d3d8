"""The cross-model summary of a model series: one row per model, from the results JSONs alone.

Per model: its source, head count, baseline perplexity, the K (and fraction of heads) that keeps 90 %
of the variance, the perplexity ratio at fixed fractions of the heads (at the evaluated K nearest to
``fraction * n_heads``; that K is recorded), and the gate. Models the gate skipped are listed with the
reason. Written as ``series_summary.json`` beside the per-model results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["SERIES_FRACTIONS", "series_summary"]

#: Fractions of the heads at which the summary reads the perplexity ratio.
SERIES_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def _k90(variance: dict[str, Any]) -> tuple[int | None, float | None]:
    row = next((t for t in variance.get("thresholds", []) if t["threshold"] == 0.9), None)
    return (None, None) if row is None else (int(row["K"]), float(row["fraction_of_heads"]))


def _model_row(results: dict[str, Any], fractions: Sequence[float]) -> dict[str, Any]:
    meta, rows = results["metadata"], results["perplexity_vs_k"]
    n = int(results["variance"]["n_heads"])
    k90, k90_frac = _k90(results["variance"])
    at = []
    for f in fractions:
        row = min(rows, key=lambda r: (abs(r["K"] - f * n), r["K"]))
        at.append({"fraction": f, "K": int(row["K"]), "K_fraction": row["K"] / n, "ratio": row["ratio"]})
    return {
        "model": meta["model"],
        "model_source": meta["model_source"],
        "n_heads": n,
        "n_layers": int(meta["model_config"]["n_layers"]),
        "baseline_ppl": results["baseline"]["ppl"],
        "k_90_variance": k90,
        "k_90_variance_fraction": k90_frac,
        "ratio_at_fraction": at,
        "gate": results["gate"],
        "complete": bool(results.get("status", {}).get("complete", False)),
    }


def series_summary(
    results: Sequence[dict[str, Any]],
    skipped: Sequence[tuple[str, str]] = (),
    fractions: Sequence[float] = SERIES_FRACTIONS,
) -> dict[str, Any]:
    """The cross-model summary document of ``results`` (results JSONs, in series order).

    Returns:
        ``{"series": {"models": [row per model], "skipped": [{"model", "reason"}], "fractions": [...]}}``;
        each row: ``model``, ``model_source``, ``n_heads``, ``n_layers``, ``baseline_ppl``,
        ``k_90_variance``, ``k_90_variance_fraction``, ``ratio_at_fraction`` (``fraction``, ``K``,
        ``K_fraction``, ``ratio``), ``gate``, ``complete``.
    """
    return {
        "series": {
            "fractions": list(fractions),
            "models": [_model_row(r, fractions) for r in results],
            "skipped": [{"model": m, "reason": why} for m, why in skipped],
        }
    }
