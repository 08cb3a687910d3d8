"""The null-baselines figure: the real variance and perplexity curves against chance."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from .common import band, finish_two_panels, two_panels

__all__ = ["baselines_figure", "figures"]


def baselines_figure(
    nulls: Any,
    real_sweep: Any = None,
    random_sweep: Any = None,
    title: str = "Real PCA vs null baselines",
) -> go.Figure:
    """Variance curve with spectrum nulls (left) and PPL ratio vs K with the random-subspace band (right).

    Args:
        nulls: :func:`qk_subspace.decomposition.nulls.spectrum_nulls` table.
        real_sweep: a :func:`qk_subspace.sweep` / :func:`qk_subspace.sweep_k` table (K, ratio) of the real PCA.
        random_sweep: a :func:`qk_subspace.evaluation.sweeps.random_subspace_sweep` table.
    """
    fig = two_panels("cumulative explained variance")
    styles = {
        "real": ("#000000", "solid"),
        "shuffled": ("#ff7f0e", "dash"),
        "gaussian": ("#2ca02c", "dash"),
        "random_subspace": ("#7f7f7f", "dot"),
        "marchenko_pastur": ("#9467bd", "dashdot"),
    }
    for curve, grp in nulls.groupby("curve", sort=False):
        color, dash = styles.get(str(curve), ("#333333", "solid"))
        err = (
            dict(type="data", array=grp["std"], visible=True, thickness=1)
            if grp["std"].abs().sum() > 0
            else None
        )
        label = {
            "real": "real heads",
            "shuffled": "entries shuffled within heads",
            "gaussian": "Gaussian heads, matched norms",
            "random_subspace": "random K-dim subspace (K/r)",
            "marchenko_pastur": "Marchenko-Pastur (i.i.d.)",
        }.get(str(curve), str(curve))
        fig.add_trace(
            go.Scatter(
                x=grp["K"],
                y=grp["cumulative_variance"],
                mode="lines",
                name=label,
                line=dict(color=color, dash=dash),
                error_y=err,
            ),
            row=1,
            col=1,
        )
    curve = dict(mode="lines+markers")
    if real_sweep is not None:
        real = go.Scatter(
            x=real_sweep["K"], y=real_sweep["ratio"], name="real PCA", line=dict(color="#000000"), **curve
        )
        fig.add_trace(real, row=1, col=2)
    if random_sweep is not None:
        agg = random_sweep.groupby("K")["ratio"].agg(["mean", "min", "max"]).reset_index()
        band(
            fig,
            agg["K"],
            agg["min"],
            agg["max"],
            "random subspace (min-max)",
            "rgba(127,127,127,0.25)",
            col=2,
        )
        mean = go.Scatter(
            x=agg["K"],
            y=agg["mean"],
            name="random subspace (mean)",
            line=dict(color="#7f7f7f", dash="dot"),
            **curve,
        )
        fig.add_trace(mean, row=1, col=2)
    return finish_two_panels(fig, title, "K (components kept)")


def figures(results: dict) -> dict[str, go.Figure]:
    """``baselines_<model>`` of a run with ``--baselines`` (empty dict otherwise)."""
    import pandas as pd

    bl = results.get("baselines")
    if not (bl and bl.get("spectrum_nulls")):
        return {}
    m, space = results["metadata"]["model"], results["metadata"].get("space", "raw")
    rand = pd.DataFrame(bl["random_subspace"]) if bl.get("random_subspace") else None
    fig = baselines_figure(
        pd.DataFrame(bl["spectrum_nulls"]),
        pd.DataFrame(results["perplexity_vs_k"]),
        rand,
        title=f"{m}, {space} space: real PCA vs null baselines",
    )
    return {f"baselines_{m}": fig}
