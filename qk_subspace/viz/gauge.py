"""The gauge study figure: variance and perplexity curves of each space under random gauges."""

from __future__ import annotations

import plotly.graph_objects as go

from .common import SPACE_COLORS

__all__ = ["gauge_figure", "figures"]


def gauge_figure(study: object, title: str = "Gauge dependence of the QK PCA") -> go.Figure:
    """Overlay of the variance and PPL-vs-K curves of every space under every gauge.

    ``study`` is a :class:`qk_subspace.gauge_report.GaugeStudy`. Left: cumulative explained variance
    vs K; right: perplexity ratio vs K (log scale). Gauge 0 (the model as loaded) is drawn solid,
    random gauges dashed; raw curves move between gauges, circuit curves lie on top of each other.
    """
    from plotly.subplots import make_subplots

    table = study.table  # type: ignore[attr-defined]
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("cumulative explained variance", "perplexity ratio (log)")
    )
    for (space, gauge), grp in table.groupby(["space", "gauge"], sort=True):
        color = SPACE_COLORS.get(str(space), "#333333")
        name = f"{space}, {'as loaded' if gauge == 0 else f'gauge {gauge}'}"
        line = dict(color=color, dash="solid" if gauge == 0 else "dash", width=2.5 if gauge == 0 else 1.3)
        fig.add_trace(
            go.Scatter(
                x=grp["K"],
                y=grp["cumulative_variance"],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line=line,
                marker=dict(size=4),
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=grp["K"],
                y=grp["ratio"],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=False,
                line=line,
                marker=dict(size=4),
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="K (components kept)")
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480)
    return fig


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
