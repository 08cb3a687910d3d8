"""6B: perplexity vs the number of kept components K (a function of the results JSON)."""

from __future__ import annotations

import plotly.graph_objects as go

from .common import RATIO_THRESHOLDS, log_ticks, ref_line

__all__ = ["figures", "fig_ppl_vs_k"]


def fig_ppl_vs_k(results: dict, thresholds: tuple[float, ...] = RATIO_THRESHOLDS) -> go.Figure:
    """6B: perplexity vs K (log scale) with CI error bars, ratio on hover, baseline and ratio lines."""
    rows = results["perplexity_vs_k"]
    base = results["baseline"]["ppl"]
    model = results["metadata"]["model"]
    x = [r["K"] for r in rows]
    y = [r["ppl"] for r in rows]
    hi = [base * r["ratio_high"] - r["ppl"] for r in rows]
    lo = [r["ppl"] - base * r["ratio_low"] for r in rows]
    custom = [[r["ratio"], r["ratio_low"], r["ratio_high"], 100 * r["cumulative_variance"]] for r in rows]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="lines+markers",
            name="PCA top-K reconstruction",
            customdata=custom,
            error_y={"type": "data", "array": hi, "arrayminus": lo, "visible": True},
            hovertemplate=(
                "K=%{x}<br>PPL %{y:.4g}<br>ratio %{customdata[0]:.4g}x "
                "[%{customdata[1]:.4g}, %{customdata[2]:.4g}]<br>cumulative variance %{customdata[3]:.1f}%<extra></extra>"
            ),
        )
    )
    ref_line(fig, x, base, f"baseline {base:.4g}", dash="solid", color="black")
    for t, color in zip(thresholds, ("seagreen", "darkorange", "crimson", "grey", "grey"), strict=False):
        ref_line(fig, x, base * t, f"{t}x baseline", color=color)
    fig.update_layout(
        title=f"6B: perplexity vs number of kept components K ({model})",
        xaxis_title="K (components kept; K = number of heads means all)",
        yaxis_title="perplexity (log scale)",
        yaxis_type="log",
        template="plotly_white",
        width=800,
        height=500,
    )
    fig.update_yaxes(**log_ticks(y + [base * max(thresholds, default=1.0)]))
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``exp6b_ppl_vs_K_<model>``."""
    return {f"exp6b_ppl_vs_K_{results['metadata']['model']}": fig_ppl_vs_k(results)}
