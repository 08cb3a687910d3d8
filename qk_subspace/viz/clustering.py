"""6C: perplexity with heads replaced by cluster representatives, and the 2D PCA map of the heads."""

from __future__ import annotations

import plotly.graph_objects as go

from .common import circuit_name, log_ticks, ref_line

__all__ = ["figures", "fig_cluster_ppl", "fig_cluster_viz"]


def fig_cluster_ppl(results: dict) -> go.Figure:
    """6C: perplexity vs number of clusters k (log scale), replaced heads and ratio on hover."""
    rows = results["clustering"]["rows"]
    base = results["baseline"]["ppl"]
    model = results["metadata"]["model"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[r["k"] for r in rows],
            y=[r["ppl"] for r in rows],
            mode="lines+markers",
            name="cluster representatives",
            customdata=[[r["replaced"], r["ratio"], r["ratio_low"], r["ratio_high"]] for r in rows],
            error_y={
                "type": "data",
                "visible": True,
                "array": [base * r["ratio_high"] - r["ppl"] for r in rows],
                "arrayminus": [r["ppl"] - base * r["ratio_low"] for r in rows],
            },
            hovertemplate=(
                "k=%{x} clusters (%{customdata[0]} heads replaced)<br>PPL %{y:.4g}<br>"
                "ratio %{customdata[1]:.4g}x [%{customdata[2]:.4g}, %{customdata[3]:.4g}]<extra></extra>"
            ),
        )
    )
    ref_line(fig, [r["k"] for r in rows], base, f"baseline {base:.4g}", dash="solid", color="black")
    fig.update_layout(
        title=f"6C: perplexity with each cluster replaced by its representative ({model})",
        xaxis_title="number of clusters k",
        yaxis_title="perplexity (log scale)",
        yaxis_type="log",
        template="plotly_white",
        width=800,
        height=500,
    )
    fig.update_yaxes(**log_ticks([r["ppl"] for r in rows] + [base]))
    return fig


def fig_cluster_viz(results: dict) -> go.Figure:
    """2D PCA map of the heads: left coloured by layer, right by cluster (``map_k``)."""
    from plotly.subplots import make_subplots

    rows = results["pca_map"]
    model = results["metadata"]["model"]
    map_k = results["metadata"]["grids"].get("map_k")
    pc = results["variance"]["explained_variance_ratio"]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=(
            "coloured by layer",
            f"coloured by cluster (k={map_k})" if map_k else "no clustering",
        ),
    )
    xs, ys = [r["pc1"] for r in rows], [r["pc2"] for r in rows]
    text = [r["label"] for r in rows]
    hover = "%{text}<br>PC1 %{x:.3g}<br>PC2 %{y:.3g}<br>%{customdata}<extra></extra>"
    n_layers = max(r["layer"] for r in rows) + 1
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            text=text,
            customdata=[f"layer {r['layer']}" for r in rows],
            hovertemplate=hover,
            showlegend=False,
            marker={
                "color": [r["layer"] for r in rows],
                "colorscale": "Viridis",
                "cmin": 0,
                "cmax": max(1, n_layers - 1),
                "size": 8,
                "colorbar": {"title": "layer", "x": 0.44},
                "line": {"width": 0.5, "color": "white"},
            },
        ),
        row=1,
        col=1,
    )
    clusters = sorted({r["cluster"] for r in rows if r["cluster"] is not None})
    for c in clusters:
        sel = [r for r in rows if r["cluster"] == c]
        fig.add_trace(
            go.Scatter(
                x=[r["pc1"] for r in sel],
                y=[r["pc2"] for r in sel],
                mode="markers",
                name=f"cluster {c}",
                text=[r["label"] for r in sel],
                customdata=[f"cluster {c}" for _ in sel],
                hovertemplate=hover,
                marker={"size": 8, "line": {"width": 0.5, "color": "white"}},
            ),
            row=1,
            col=2,
        )
    for col in (1, 2):
        fig.update_xaxes(title_text=f"PC1 ({100 * pc[0]:.1f}%)", row=1, col=col)
        fig.update_yaxes(title_text=f"PC2 ({100 * pc[1]:.1f}%)" if len(pc) > 1 else "PC2", row=1, col=col)
    fig.update_layout(
        title=f"PCA 2D map of the heads' {circuit_name(results)} ({model})",
        template="plotly_white",
        width=1100,
        height=500,
    )
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``exp6c_cluster_ppl_<model>`` and ``exp6c_cluster_viz_<model>``."""
    m = results["metadata"]["model"]
    return {
        f"exp6c_cluster_ppl_{m}": fig_cluster_ppl(results),
        f"exp6c_cluster_viz_{m}": fig_cluster_viz(results),
    }
