"""6B: the perplexity ratio vs the number of kept components K (a function of the results JSON).

Two panels share the K axis: the whole range on a log axis, and a linear zoom near the baseline where
the 1.05x / 1.1x / 1.2x lines are apart. Dotted verticals mark the K that reach 90 % and 95 % of the
variance (6A), the report's point that variance is not what the model needs.
"""

from __future__ import annotations

import plotly.graph_objects as go

from .common import RATIO_THRESHOLDS, log_ticks

__all__ = ["fig_ppl_vs_k", "figures"]

#: The zoom panel shows ratios up to this.
ZOOM_MAX = 1.3
_COLORS = ("seagreen", "darkorange", "crimson", "grey", "grey")


def _variance_marks(results: dict) -> list[tuple[float, int]]:
    return [(t["threshold"], t["K"]) for t in results["variance"]["thresholds"] if t["threshold"] >= 0.9]


def fig_ppl_vs_k(results: dict, thresholds: tuple[float, ...] = RATIO_THRESHOLDS) -> go.Figure:
    """6B: perplexity ratio vs K with bootstrap CIs (log, and a zoom near 1), perplexity on hover."""
    from plotly.subplots import make_subplots

    rows = results["perplexity_vs_k"]
    base = results["baseline"]["ppl"]
    model = results["metadata"]["model"]
    x = [r["K"] for r in rows]
    ratio = [r["ratio"] for r in rows]
    error = {
        "type": "data",
        "array": [r["ratio_high"] - r["ratio"] for r in rows],
        "arrayminus": [r["ratio"] - r["ratio_low"] for r in rows],
        "visible": True,
    }
    custom = [[r["ppl"], r["ratio_low"], r["ratio_high"], 100 * r["cumulative_variance"]] for r in rows]
    hover = (
        "K=%{x}<br>ratio %{y:.4g}x [%{customdata[1]:.4g}, %{customdata[2]:.4g}]<br>PPL %{customdata[0]:.4g}"
        "<br>cumulative variance %{customdata[3]:.1f}%<extra></extra>"
    )
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.62, 0.38],
        vertical_spacing=0.06,
        subplot_titles=("perplexity ratio to the baseline (log)", f"zoom: ratios up to {ZOOM_MAX}x"),
    )
    for row in (1, 2):
        curve = go.Scatter(
            x=x, y=ratio, mode="lines+markers", name="PCA top-K reconstruction", legendgroup="sweep",
            showlegend=row == 1, customdata=custom, error_y=error, hovertemplate=hover, line={"color": "#1f77b4"},
        )  # fmt: skip
        fig.add_trace(curve, row=row, col=1)
        for t, color in zip((1.0, *thresholds), ("black", *_COLORS), strict=False):
            name = f"baseline (PPL {base:.4g})" if t == 1.0 else f"{t}x baseline"
            line = go.Scatter(
                x=[min(x), max(x)], y=[t, t], mode="lines", name=name, legendgroup=name, showlegend=row == 1,
                line={"color": color, "dash": "solid" if t == 1.0 else "dash", "width": 1}, hoverinfo="skip",
            )  # fmt: skip
            fig.add_trace(line, row=row, col=1)
    for frac, K in _variance_marks(results):
        fig.add_vline(x=K, line_dash="dot", line_color="purple", row="all", col=1)
        fig.add_annotation(
            x=K, y=1.0, yref="paper", text=f"{100 * frac:.0f}% variance: K={K}", showarrow=False,
            textangle=-90, xanchor="right", yanchor="top", font={"color": "purple", "size": 10},
        )  # fmt: skip
    fig.update_yaxes(type="log", row=1, col=1, **log_ticks(ratio + [max(thresholds, default=1.0)]))
    fig.update_yaxes(range=[0.98, ZOOM_MAX], row=2, col=1)
    fig.update_xaxes(title_text="K (components kept; K = number of heads means all)", row=2, col=1)
    fig.update_layout(
        title=f"6B: perplexity ratio vs number of kept components K ({model})",
        template="plotly_white",
        width=850,
        height=650,
    )
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``exp6b_ppl_vs_K_<model>``."""
    return {f"exp6b_ppl_vs_K_{results['metadata']['model']}": fig_ppl_vs_k(results)}
