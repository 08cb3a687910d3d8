"""Figures of function-aware importance: variance vs importance order, per-head costs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..report.reference import REFERENCE_GPT2_SMALL, is_gpt2_small

__all__ = ["SEED_REPORT_RATIOS", "figures", "head_importance_figure", "importance_overlay_figure"]


def figures(results: dict) -> dict[str, go.Figure]:
    """``importance_overlay_<model>`` of a run with ``order="importance"`` (empty dict otherwise)."""
    import pandas as pd

    rows = results.get("perplexity_vs_k_importance")
    if not rows:
        return {}
    meta = results["metadata"]
    m = meta["model"]
    n = meta["model_config"]["n_layers"] * meta["model_config"]["n_heads"]
    circuit = meta.get("circuit", "qk")
    method = (results.get("importance") or {}).get("method", "")
    return {
        f"importance_overlay_{m}": importance_overlay_figure(
            pd.DataFrame(results["perplexity_vs_k"]),
            pd.DataFrame(rows),
            threshold=meta.get("gate", {}).get("threshold", 1.1),
            # the seed report measured GPT-2 small: its curve belongs on no other model's K axis
            reference=SEED_REPORT_RATIOS if circuit == "qk" and is_gpt2_small(results) else None,
            reference_scale=n / 144,
            title=f"{m}, {circuit.upper()}: compression by PCA variance vs by {method} importance",
        )
    }


#: The seed report's 6B table (GPT-2 small, WikiText-2): perplexity ratio at each K of 144, read from
#: :data:`qk_subspace.report.REFERENCE_GPT2_SMALL` (the one place the report's numbers are transcribed).
SEED_REPORT_RATIOS: dict[int, float] = {
    k: ratio for k, (_, _, ratio) in REFERENCE_GPT2_SMALL["perplexity_vs_k"].items()
}


def _sweep_trace(df: Any, name: str, color: str) -> go.Scatter:
    return go.Scatter(
        x=df["K"],
        y=df["ratio"],
        name=name,
        mode="lines+markers",
        line={"color": color},
        error_y={
            "type": "data",
            "symmetric": False,
            "array": df["ratio_high"] - df["ratio"],
            "arrayminus": df["ratio"] - df["ratio_low"],
            "thickness": 1,
        },
        customdata=np.stack([df["cumulative_variance"]], axis=-1),
        hovertemplate="K=%{x}<br>ratio=%{y:.3f}<br>variance kept=%{customdata[0]:.1%}",
    )


def importance_overlay_figure(
    variance_sweep: Any,
    importance_sweep: Any,
    threshold: float = 1.1,
    reference: Mapping[int, float] | None = SEED_REPORT_RATIOS,
    reference_scale: float = 1.0,
    title: str | None = None,
) -> go.Figure:
    """Perplexity ratio vs K for variance-ordered and importance-ordered compression, overlaid.

    Args:
        variance_sweep, importance_sweep: :func:`qk_subspace.sweep_k` results with
            ``order="variance"`` and ``order="importance"`` (columns ``K``, ``ratio``,
            ``ratio_low``, ``ratio_high``, ``cumulative_variance``).
        threshold: a dashed horizontal line at this ratio (default the report's 1.1x goal).
        reference: the seed report's ratios by K (GPT-2 small, variance order), drawn as a grey
            trace; ``None`` omits it.
        reference_scale: multiply the reference K by this (e.g. ``n_heads / 144`` to compare a
            model with ``n_heads`` heads at the same fraction of components).
    """
    fig = go.Figure()
    fig.add_trace(_sweep_trace(variance_sweep, "variance order (top-K PCs)", "#1f77b4"))
    fig.add_trace(_sweep_trace(importance_sweep, "importance order (K most important PCs)", "#d62728"))
    if reference:
        ks = sorted(reference)
        scaled = "" if reference_scale == 1.0 else f", K x {reference_scale:.3g}"
        fig.add_trace(
            go.Scatter(
                x=[k * reference_scale for k in ks],
                y=[reference[k] for k in ks],
                mode="lines+markers",
                name=f"seed report (GPT-2 small, QK, variance order{scaled})",
                line={"color": "grey", "dash": "dot"},
                marker={"symbol": "x"},
            )
        )
    ks_all = list(variance_sweep["K"]) + list(importance_sweep["K"])
    fig.add_trace(
        go.Scatter(  # a trace, not add_hline: hline annotations misplace on log axes
            x=[min(ks_all), max(ks_all)],
            y=[threshold, threshold],
            mode="lines",
            name=f"{threshold:g}x baseline",
            line={"dash": "dash", "color": "black", "width": 1},
        )
    )
    fig.update_yaxes(type="log", title="perplexity ratio to baseline (log)")
    fig.update_xaxes(title="K (components kept)")
    fig.update_layout(
        title=title or "Compression by PCA variance vs by measured importance",
        template="plotly_white",
        width=900,
        height=520,
        legend={"x": 0.4, "y": 0.98},
    )
    return fig


def head_importance_figure(df: Any, column: str = "ratio", title: str | None = None) -> go.Figure:
    """Layer x head heatmap of a :func:`qk_subspace.head_importance` column (default ``ratio``)."""
    from ..evaluation.importance import head_importance_matrix

    z = head_importance_matrix(df, column)
    L, H = z.shape
    text = [[f"L{layer}H{head}<br>{z[layer, head]:.4g}" for head in range(H)] for layer in range(L)]
    mode = df.attrs.get("mode", "only")
    what = "compress only this head" if mode == "only" else "compress all heads but this one"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"H{h}" for h in range(H)],
            y=[f"L{layer}" for layer in range(L)],
            colorscale="Viridis",
            text=text,
            texttemplate="%{text}",
            hovertemplate="%{text}<extra></extra>",
            colorbar={"title": column},
        )
    )
    fig.update_yaxes(autorange="reversed")
    k = df.attrs.get("K")
    fig.update_layout(
        title=title or f"Head-level importance ({df.attrs.get('circuit', 'qk').upper()}, {what}, K={k})",
        template="plotly_white",
        width=120 + 70 * H,
        height=160 + 60 * L,
    )
    return fig
