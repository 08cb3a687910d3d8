"""Shared pieces of the figures: circuit names, reference lines, log-axis ticks, colours."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = [
    "RATIO_THRESHOLDS",
    "SPACE_COLORS",
    "add_pair",
    "band",
    "circuit_name",
    "finish_two_panels",
    "log_ticks",
    "ref_line",
    "two_panels",
]


#: Perplexity-ratio lines drawn on the K sweep (the report's README predictions: 1.05x, 1.1x, 1.2x).
RATIO_THRESHOLDS = (1.05, 1.1, 1.2)
#: Colour of each PCA space in the comparison figures.
SPACE_COLORS = {"raw": "#d62728", "canonical": "#9467bd", "circuit": "#1f77b4"}


def circuit_name(results: dict) -> str:
    return "W_OV" if results["metadata"].get("circuit") == "ov" else "W_QK"


def ref_line(fig: go.Figure, x: list, y: float, name: str, dash: str = "dash", color: str = "grey") -> None:
    """A horizontal reference line as a trace (``add_hline`` annotations land wrong on log axes)."""
    xs = [min(x), max(x)] if x else [0, 1]
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=[y, y],
            mode="lines",
            name=name,
            line={"dash": dash, "color": color, "width": 1.5},
            hovertemplate=f"{name}: %{{y:.4g}}<extra></extra>",
        )
    )


def log_ticks(values: list[float]) -> dict[str, Any]:
    """Readable log-axis ticks (1, 2, 5 x 10^n) covering ``values``; plotly's default labels the
    minor ticks with bare leading digits ("2" for 200)."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v) and v > 0]
    if not vals:
        return {}
    lo, hi = np.floor(np.log10(min(vals))), np.ceil(np.log10(max(vals)))
    ticks = [m * 10.0**e for e in range(int(lo), int(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if min(vals) / 2.5 <= t <= max(vals) * 2.5]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def two_panels(left: str, right: str = "perplexity ratio (log)") -> go.Figure:
    """A 1 x 2 figure: a variance-like panel on the left, the perplexity ratio on the right."""
    from plotly.subplots import make_subplots

    return make_subplots(rows=1, cols=2, subplot_titles=(left, right))


def add_pair(fig: go.Figure, x: Any, left: Any, right: Any, name: str, **style: Any) -> None:
    """One curve in each panel of :func:`two_panels` (one legend entry): ``left`` and ``right`` against ``x``."""
    for col, y in ((1, left), (2, right)):
        trace = go.Scatter(
            x=x, y=y, mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1, **style
        )
        fig.add_trace(trace, row=1, col=col)


def finish_two_panels(fig: go.Figure, title: str, x_title: str, unit_left: bool = True) -> go.Figure:
    """Axes and layout of a :func:`two_panels` figure (left axis [0, 1] when ``unit_left``, right axis log)."""
    fig.update_xaxes(title_text=x_title)
    if unit_left:
        fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480)
    return fig


def band(
    fig: go.Figure,
    x: Any,
    low: Any,
    high: Any,
    name: str,
    fill: str,
    row: int = 1,
    col: int = 1,
    showlegend: bool = True,
    legendgroup: str | None = None,
) -> None:
    """A shaded band between ``low`` and ``high`` over ``x`` (one legend entry), e.g. a spread over seeds."""
    edge = dict(mode="lines", line=dict(width=0), legendgroup=legendgroup)
    fig.add_trace(go.Scatter(x=x, y=high, showlegend=False, hoverinfo="skip", **edge), row=row, col=col)
    fig.add_trace(
        go.Scatter(x=x, y=low, fill="tonexty", fillcolor=fill, name=name, showlegend=showlegend, **edge),
        row=row, col=col,
    )  # fmt: skip
