"""Per-layer vs global PCA at equal parameter count."""

from __future__ import annotations

import plotly.graph_objects as go

__all__ = ["layerwise_figure", "figures"]


def layerwise_figure(
    table: object, title: str = "Per-layer vs global PCA at equal parameter count"
) -> go.Figure:
    """Variance about the global mean (left) and PPL ratio (right) vs parameters stored.

    ``table`` is :func:`qk_subspace.spaces.compare_layerwise_global` output.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("variance explained (about the global mean)", "perplexity ratio (log)"),
    )
    for groupby, grp in table.groupby("groupby"):  # type: ignore[attr-defined]
        name = "per layer" if groupby == "layer" else "global"
        color = "#2ca02c" if groupby == "layer" else "#000000"
        text = [f"K={k}" for k in grp["K"]]
        fig.add_trace(
            go.Scatter(
                x=grp["n_params"],
                y=grp["global_variance"],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                text=text,
                line=dict(color=color),
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=grp["n_params"],
                y=grp["ratio"],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=False,
                text=text,
                line=dict(color=color),
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="numbers stored (means + components + coefficients)")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480)
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    """``layerwise_<model>`` of a run with ``--groupby layer`` (empty dict otherwise)."""
    import pandas as pd

    lw = results.get("layerwise")
    if not (lw and lw.get("per_layer")):
        return {}
    m, space = results["metadata"]["model"], results["metadata"].get("space", "raw")
    per_layer = pd.DataFrame(lw["per_layer"])
    glob = {int(r["K"]): r for r in lw["global"]}
    rows = [dict(glob[p["K_global"]], K_layer=p["K_layer"]) for p in lw["matched"] if p["K_global"] in glob]
    table = pd.concat([per_layer.assign(K_layer=per_layer["K"]), pd.DataFrame(rows)], ignore_index=True)
    fig = layerwise_figure(
        table, title=f"{m}, {space} space: per-layer vs global PCA at equal parameter count"
    )
    return {f"layerwise_{m}": fig}
