"""The space comparison figure: perplexity ratio vs K and vs stored values, raw / canonical / invariant
curves with their spread over gauges, the random-subspace null band and the mean-head lines."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .common import SPACE_COLORS, band, log_ticks

__all__ = ["comparison_figure", "figures"]

_NAMES = {
    "raw": "raw W_Q^T W_K",
    "canonical": "canonical gauge",
    "circuit": "invariant circuit (joint edit)",
    "random": "random subspaces (circuit)",
}
_FILL = {
    "raw": "rgba(214,39,40,0.18)",
    "circuit": "rgba(31,119,180,0.25)",
    "random": "rgba(120,120,120,0.22)",
}


def comparison_figure(table: pd.DataFrame, title: str = "raw vs invariant QK PCA") -> go.Figure:
    """Two panels sharing the legend: ratio vs K (left) and ratio vs stored values (right), log ratio axes.

    Raw and invariant curves are drawn for the model as loaded (solid) with a band spanning every gauge;
    the canonical curve once; the random subspaces as a min-max band with their mean (dotted); the K = 0
    ratio of the raw and the invariant curve as dashed horizontal mean-head lines.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("ratio vs K", "ratio vs stored values"))
    ratios = table["ratio"].tolist()
    for col, xcol in ((1, "K"), (2, "stored_values")):
        for curve in ("random", "raw", "circuit"):
            sub = table[table["curve"] == curve]
            if sub.empty or (curve != "random" and sub["gauge"].nunique() < 2):
                continue
            agg = (
                sub.groupby("K")
                .agg(lo=("ratio", "min"), hi=("ratio", "max"), x=(xcol, "first"))
                .reset_index()
            )
            label = f"{_NAMES[curve]}: {'seeds' if curve == 'random' else 'all gauges'} (min-max)"
            band(
                fig,
                agg["x"],
                agg["lo"],
                agg["hi"],
                label,
                _FILL[curve],
                1,
                col,
                showlegend=col == 1,
                legendgroup=label,
            )
        for curve in ("raw", "canonical", "circuit", "random"):
            sub = table[(table["curve"] == curve) & (table["gauge"] == 0)]
            if sub.empty:
                continue
            extra = ""
            if curve == "random":
                sub = sub.groupby("K").agg(ratio=("ratio", "mean"), x=(xcol, "first")).reset_index()
                x, style = sub["x"], dict(color="#777777", dash="dot", width=1.5)
            else:
                x, style = sub[xcol], dict(color=SPACE_COLORS.get(curve, "#333333"), width=2.4)
                if curve == "circuit":  # how much of each target the realised circuits miss
                    extra = ", residual %{customdata:.3g}"
            fig.add_trace(
                go.Scatter(
                    x=x, y=sub["ratio"], mode="lines+markers", marker=dict(size=5), line=style,
                    name=_NAMES[curve] + (" (mean)" if curve == "random" else ", as loaded"),
                    legendgroup=curve, showlegend=col == 1,
                    customdata=sub.get("residual_total"),
                    hovertemplate="%{x}: %{y:.4g}x" + extra + "<extra>" + _NAMES[curve] + "</extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
        xs = table[xcol].tolist()
        for curve, color in (("raw", SPACE_COLORS["raw"]), ("circuit", SPACE_COLORS["circuit"])):
            k0 = table[(table["curve"] == curve) & (table["gauge"] == 0) & (table["K"] == 0)]
            if len(k0):
                y = float(k0["ratio"].iloc[0])
                fig.add_trace(
                    go.Scatter(
                        x=[min(xs), max(xs)], y=[y, y], mode="lines", line=dict(dash="dash", color=color, width=1),
                        name=f"mean head ({curve}, K=0)", legendgroup=f"mean-{curve}", showlegend=col == 1,
                        hovertemplate=f"K=0 ({curve}): %{{y:.4g}}x<extra></extra>",
                    ),
                    row=1, col=col,
                )  # fmt: skip
    fig.update_yaxes(type="log", title_text="perplexity ratio (log)", **log_ticks(ratios))
    fig.update_xaxes(title_text="K (components kept)", row=1, col=1)
    fig.update_xaxes(title_text="stored values (log)", type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1250, height=520)
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``compare_<model>`` of a comparison results document (empty dict for other documents)."""
    comp = results.get("comparison")
    if not (comp and comp.get("table")):
        return {}
    m = results["metadata"]["model"]
    return {
        f"compare_{m}": comparison_figure(pd.DataFrame(comp["table"]), title=f"{m}: raw vs invariant QK PCA")
    }
