"""The model-series figure: per model the perplexity ratio at fractions of the heads (left) and the
fraction of heads that keeps 90 % of the variance with the baseline perplexity (right)."""

from __future__ import annotations

import plotly.graph_objects as go

__all__ = ["figures", "series_figure"]


def series_figure(summary: dict) -> go.Figure:
    """The figure of a :func:`~qk_subspace.report.series.series_summary` document."""
    from plotly.subplots import make_subplots

    rows = summary["series"]["models"]
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("ratio vs kept fraction of heads", "K for 90 % variance / heads"),
        specs=[[{}, {"secondary_y": True}]],
    )  # fmt: skip
    for r in rows:
        pts = r["ratio_at_fraction"]
        fig.add_trace(
            go.Scatter(
                x=[p["K_fraction"] for p in pts], y=[p["ratio"] for p in pts], mode="lines+markers",
                name=r["model"], hovertemplate="K=%{customdata}<br>ratio %{y:.3f}<extra>" + r["model"] + "</extra>",
                customdata=[p["K"] for p in pts],
            ),
            row=1, col=1,
        )  # fmt: skip
    names = [r["model"] for r in rows]
    fig.add_trace(
        go.Bar(x=names, y=[r["k_90_variance_fraction"] for r in rows], name="K(90 %) / heads", opacity=0.7),
        row=1, col=2,
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=names, y=[r["baseline_ppl"] for r in rows], name="baseline perplexity", mode="markers",
                   marker={"symbol": "diamond", "size": 10, "color": "black"}),
        row=1, col=2, secondary_y=True,
    )  # fmt: skip
    fig.update_yaxes(type="log", title_text="perplexity ratio (log)", row=1, col=1)
    fig.update_xaxes(title_text="K / heads", row=1, col=1)
    fig.update_yaxes(title_text="fraction of heads", row=1, col=2, secondary_y=False)
    fig.update_yaxes(title_text="baseline perplexity", row=1, col=2, secondary_y=True)
    fig.update_layout(
        title=f"model series ({len(rows)} models)", template="plotly_white", width=1100, height=450
    )
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``{"series_summary": figure}`` for a series summary document, else ``{}``."""
    if "series" not in results or not results["series"]["models"]:
        return {}
    return {"series_summary": series_figure(results)}
