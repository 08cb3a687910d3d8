"""Shared pieces of the figures: circuit names, reference lines, log-axis ticks, colours."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = ["RATIO_THRESHOLDS", "SPACE_COLORS", "circuit_name", "log_ticks", "ref_line"]


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
