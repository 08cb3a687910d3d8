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


def _group_traces(fig: go.Figure, rows: list[dict], key: str, col: int, label: str, labels_on: bool) -> None:
    """One trace per value of ``key`` (a discrete legend), heads labelled ``L{layer}H{head}`` on the map."""
    hover = "%{text}<br>PC1 %{x:.3g}<br>PC2 %{y:.3g}<br>%{customdata}<extra></extra>"
    palette = px_colors()
    for i, value in enumerate(sorted({r[key] for r in rows if r[key] is not None})):
        sel = [r for r in rows if r[key] == value]
        fig.add_trace(
            go.Scatter(
                x=[r["pc1"] for r in sel],
                y=[r["pc2"] for r in sel],
                mode="markers+text" if labels_on else "markers",
                name=f"{label} {value}",
                legendgroup=f"{label}{col}",
                legendgrouptitle_text=f"{label}s" if i == 0 else None,
                text=[r["label"] for r in sel],
                textposition="top center",
                textfont={"size": 8, "color": "#555555"},
                customdata=[f"{label} {value}" for _ in sel],
                hovertemplate=hover,
                marker={
                    "size": 8,
                    "color": palette[i % len(palette)],
                    "line": {"width": 0.5, "color": "white"},
                },
            ),
            row=1,
            col=col,
        )


def px_colors() -> list[str]:
    """A qualitative palette (discrete layers and clusters)."""
    import plotly.express as px

    return list(px.colors.qualitative.Dark24)


#: Heads are labelled on the map up to this many (beyond, hover shows the label).
MAX_LABELLED_HEADS = 80


def fig_cluster_viz(results: dict) -> go.Figure:
    """2D PCA map of the heads: left coloured by layer, right by cluster (``map_k``); discrete colours."""
    from plotly.subplots import make_subplots

    rows = results["pca_map"]
    model = results["metadata"]["model"]
    map_k = results["metadata"]["grids"].get("map_k")
    pc = results["variance"]["explained_variance_ratio"]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("by layer", f"by cluster (k={map_k})" if map_k else "no clustering"),
    )
    labels_on = len(rows) <= MAX_LABELLED_HEADS
    _group_traces(fig, rows, "layer", 1, "layer", labels_on)
    _group_traces(fig, rows, "cluster", 2, "cluster", labels_on)
    for col in (1, 2):
        fig.update_xaxes(title_text=f"PC1 ({100 * pc[0]:.1f}%)", row=1, col=col)
        fig.update_yaxes(title_text=f"PC2 ({100 * pc[1]:.1f}%)" if len(pc) > 1 else "PC2", row=1, col=col)
    fig.update_layout(
        title=f"PCA 2D map of the heads' {circuit_name(results)} ({model})",
        template="plotly_white",
        width=1200,
        height=560,
        legend={"groupclick": "toggleitem"},
    )
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``exp6c_cluster_ppl_<model>`` and ``exp6c_cluster_viz_<model>``."""
    m = results["metadata"]["model"]
    return {
        f"exp6c_cluster_ppl_{m}": fig_cluster_ppl(results),
        f"exp6c_cluster_viz_{m}": fig_cluster_viz(results),
    }
