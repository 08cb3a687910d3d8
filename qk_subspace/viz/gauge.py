"""The gauge study figure: variance and perplexity curves of each space under random gauges."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from .common import SPACE_COLORS, add_pair, finish_two_panels, two_panels

__all__ = ["gauge_figure", "figures"]


def gauge_figure(study: Any, title: str = "Gauge dependence of the QK PCA") -> go.Figure:
    """Overlay of the variance and PPL-vs-K curves of every space under every gauge.

    ``study`` is a :class:`qk_subspace.gauge_report.GaugeStudy`. Left: cumulative explained variance
    vs K; right: perplexity ratio vs K (log scale). Gauge 0 (the model as loaded) is drawn solid,
    random gauges dashed; raw curves move between gauges, circuit curves lie on top of each other.
    """
    table = study.table
    fig = two_panels("cumulative explained variance")
    for (space, gauge), grp in table.groupby(["space", "gauge"], sort=True):
        color = SPACE_COLORS.get(str(space), "#333333")
        name = f"{space}, {'as loaded' if gauge == 0 else f'gauge {gauge}'}"
        line = dict(color=color, dash="solid" if gauge == 0 else "dash", width=2.5 if gauge == 0 else 1.3)
        add_pair(
            fig, grp["K"], grp["cumulative_variance"], grp["ratio"], name, line=line, marker=dict(size=4)
        )
    return finish_two_panels(fig, title, "K (components kept)")


def figures(results: dict) -> dict[str, go.Figure]:
    """``gauge_<model>`` of a run with ``--gauges N`` (empty dict otherwise)."""
    import types

    import pandas as pd

    gs = results.get("gauge_study")
    if not (gs and gs.get("table")):
        return {}
    m = results["metadata"]["model"]
    study = types.SimpleNamespace(table=pd.DataFrame(gs["table"]))
    return {f"gauge_{m}": gauge_figure(study, title=f"{m}: gauge dependence of the QK PCA")}
