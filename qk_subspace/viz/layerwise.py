"""Per-layer vs global PCA at equal parameter count."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from .common import add_pair, finish_two_panels, two_panels

__all__ = ["layerwise_figure", "figures"]


def layerwise_figure(
    table: Any, title: str = "Per-layer vs global PCA at equal parameter count"
) -> go.Figure:
    """Variance about the global mean (left) and PPL ratio (right) vs parameters stored.

    ``table`` is :func:`qk_subspace.evaluation.sweeps.compare_layerwise_global` output.
    """
    fig = two_panels("variance explained (about the global mean)")
    for groupby, grp in table.groupby("groupby"):
        name = "per layer" if groupby == "layer" else "global"
        color = "#2ca02c" if groupby == "layer" else "#000000"
        text = [f"K={k}" for k in grp["K"]]
        add_pair(
            fig,
            grp["n_params"],
            grp["global_variance"],
            grp["ratio"],
            name,
            text=text,
            line=dict(color=color),
        )
    return finish_two_panels(
        fig, title, "numbers stored (means + components + coefficients)", unit_left=False
    )


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
