"""6A: cumulative explained variance of the main PCA (a function of the results JSON)."""

from __future__ import annotations

import plotly.graph_objects as go

from .common import circuit_name

__all__ = ["figures", "fig_cumvar"]


def fig_cumvar(results: dict) -> go.Figure:
    """6A: cumulative explained variance vs number of components, with the 50/80/90/95 % marks."""
    var = results["variance"]
    cum = [100 * c for c in var["cumulative_variance"]]
    model = results["metadata"]["model"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=list(range(1, len(cum) + 1)),
            y=cum,
            mode="lines+markers",
            marker={"size": 4},
            name="cumulative",
            hovertemplate="K=%{x}<br>cumulative variance %{y:.2f}%<extra></extra>",
        )
    )
    for t in var["thresholds"]:
        fig.add_hline(y=100 * t["threshold"], line_dash="dot", line_color="grey")
        reached = cum[t["K"] - 1]  # the marker sits on the curve, at the first K reaching the threshold
        fig.add_trace(
            go.Scatter(
                x=[t["K"]],
                y=[reached],
                mode="markers+text",
                text=[f"{100 * t['threshold']:.0f}%: K={t['K']}"],
                textposition="bottom right",
                marker={"size": 9, "color": "crimson"},
                showlegend=False,
                hovertemplate=f"K={t['K']} reaches {reached:.1f}% (>= {100 * t['threshold']:.0f}%)<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"6A: cumulative variance of {circuit_name(results)} across {var['n_heads']} heads ({model})",
        xaxis_title="number of components K",
        yaxis_title="cumulative explained variance (%)",
        yaxis_range=[0, 101],
        template="plotly_white",
        width=800,
        height=500,
    )
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``exp6a_cumvar_<model>``."""
    return {f"exp6a_cumvar_{results['metadata']['model']}": fig_cumvar(results)}
