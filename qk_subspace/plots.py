"""Plotly figures of the experiment, and saving them as self-contained HTML and PNG."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import plotly.graph_objects as go

__all__ = ["save_figure", "png_export_available", "gauge_figure", "baselines_figure", "layerwise_figure"]

_PNG_WARNED = False


def png_export_available() -> bool:
    """Whether a Chromium/Chrome is installed for kaleido's PNG export."""
    if os.environ.get("QK_SUBSPACE_NO_PNG"):
        return False
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    return any(shutil.which(n) for n in names)


def save_figure(fig: go.Figure, out_dir: str | os.PathLike, name: str, png: bool = True) -> dict[str, str]:
    """Write ``fig`` as ``<out_dir>/<name>.html`` (self-contained) and, if possible, ``<name>.png``.

    PNG export needs a Chromium (kaleido 1.x); without one, warns once and writes HTML only.
    Returns ``{"html": path, "png": path}`` for the files written.
    """
    global _PNG_WARNED
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"html": str(out / f"{name}.html")}
    fig.write_html(written["html"], include_plotlyjs=True, full_html=True)
    if png:
        if png_export_available():
            try:
                fig.write_image(str(out / f"{name}.png"), scale=2)
                written["png"] = str(out / f"{name}.png")
            except Exception as exc:  # kaleido/Chromium failures must not lose the run
                if not _PNG_WARNED:
                    warnings.warn(f"PNG export failed ({exc}); wrote HTML only", RuntimeWarning, stacklevel=2)
                    _PNG_WARNED = True
        elif not _PNG_WARNED:
            warnings.warn(
                "PNG export needs Chromium (e.g. `apt-get install chromium`); writing HTML figures only",
                RuntimeWarning,
                stacklevel=2,
            )
            _PNG_WARNED = True
    return written


# ----------------------------------------------------------------------------- gauge / baselines / per layer
_SPACE_COLORS = {"raw": "#d62728", "canonical": "#9467bd", "circuit": "#1f77b4"}


def gauge_figure(study: object, title: str = "Gauge dependence of the QK PCA") -> go.Figure:
    """Overlay of the variance and PPL-vs-K curves of every space under every gauge.

    ``study`` is a :class:`qk_subspace.gauge_report.GaugeStudy`. Left: cumulative explained variance
    vs K; right: perplexity ratio vs K (log scale). Gauge 0 (the model as loaded) is drawn solid,
    random gauges dashed; raw curves move between gauges, circuit curves lie on top of each other.
    """
    from plotly.subplots import make_subplots

    table = study.table  # type: ignore[attr-defined]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cumulative explained variance", "perplexity ratio (log)"))
    for (space, gauge), grp in table.groupby(["space", "gauge"], sort=True):
        color = _SPACE_COLORS.get(str(space), "#333333")
        name = f"{space}, {'as loaded' if gauge == 0 else f'gauge {gauge}'}"
        line = dict(color=color, dash="solid" if gauge == 0 else "dash", width=2.5 if gauge == 0 else 1.3)
        fig.add_trace(go.Scatter(x=grp["K"], y=grp["cumulative_variance"], mode="lines+markers", name=name,
                                 legendgroup=name, line=line, marker=dict(size=4)), row=1, col=1)
        fig.add_trace(go.Scatter(x=grp["K"], y=grp["ratio"], mode="lines+markers", name=name, legendgroup=name,
                                 showlegend=False, line=line, marker=dict(size=4)), row=1, col=2)
    fig.update_xaxes(title_text="K (components kept)")
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480)
    return fig


def baselines_figure(
    nulls: object,
    real_sweep: object | None = None,
    random_sweep: object | None = None,
    title: str = "Real PCA vs null baselines",
) -> go.Figure:
    """Variance curve with spectrum nulls (left) and PPL ratio vs K with the random-subspace band (right).

    Args:
        nulls: :func:`qk_subspace.baselines.spectrum_nulls` table.
        real_sweep: a :func:`sweep_space` / ``sweep_k`` table (K, ratio) of the real PCA.
        random_sweep: a :func:`qk_subspace.baselines.random_subspace_sweep` table.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("cumulative explained variance", "perplexity ratio (log)"))
    styles = {"real": ("#000000", "solid"), "shuffled": ("#ff7f0e", "dash"), "gaussian": ("#2ca02c", "dash"),
              "random_subspace": ("#7f7f7f", "dot"), "marchenko_pastur": ("#9467bd", "dashdot")}
    for curve, grp in nulls.groupby("curve", sort=False):  # type: ignore[attr-defined]
        color, dash = styles.get(str(curve), ("#333333", "solid"))
        err = dict(type="data", array=grp["std"], visible=True, thickness=1) if grp["std"].abs().sum() > 0 else None
        label = {"real": "real heads", "shuffled": "entries shuffled within heads",
                 "gaussian": "Gaussian heads, matched norms", "random_subspace": "random K-dim subspace (K/r)",
                 "marchenko_pastur": "Marchenko-Pastur (i.i.d.)"}.get(str(curve), str(curve))
        fig.add_trace(go.Scatter(x=grp["K"], y=grp["cumulative_variance"], mode="lines", name=label,
                                 line=dict(color=color, dash=dash), error_y=err), row=1, col=1)
    if real_sweep is not None:
        fig.add_trace(go.Scatter(x=real_sweep["K"], y=real_sweep["ratio"], mode="lines+markers", name="real PCA",  # type: ignore[index]
                                 line=dict(color="#000000")), row=1, col=2)
    if random_sweep is not None:
        agg = random_sweep.groupby("K")["ratio"].agg(["mean", "min", "max"]).reset_index()  # type: ignore[attr-defined]
        fig.add_trace(go.Scatter(x=agg["K"], y=agg["max"], mode="lines", line=dict(width=0), showlegend=False,
                                 hoverinfo="skip"), row=1, col=2)
        fig.add_trace(go.Scatter(x=agg["K"], y=agg["min"], mode="lines", line=dict(width=0), fill="tonexty",
                                 fillcolor="rgba(127,127,127,0.25)", name="random subspace (min-max)"), row=1, col=2)
        fig.add_trace(go.Scatter(x=agg["K"], y=agg["mean"], mode="lines+markers", name="random subspace (mean)",
                                 line=dict(color="#7f7f7f", dash="dot")), row=1, col=2)
    fig.update_xaxes(title_text="K (components kept)")
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480)
    return fig


def layerwise_figure(table: object, title: str = "Per-layer vs global PCA at equal parameter count") -> go.Figure:
    """Variance about the global mean (left) and PPL ratio (right) vs parameters stored.

    ``table`` is :func:`qk_subspace.spaces.compare_layerwise_global` output.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("variance explained (about the global mean)",
                                                        "perplexity ratio (log)"))
    for groupby, grp in table.groupby("groupby"):  # type: ignore[attr-defined]
        name = "per layer" if groupby == "layer" else "global"
        color = "#2ca02c" if groupby == "layer" else "#000000"
        text = [f"K={k}" for k in grp["K"]]
        fig.add_trace(go.Scatter(x=grp["n_params"], y=grp["global_variance"], mode="lines+markers", name=name,
                                 legendgroup=name, text=text, line=dict(color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=grp["n_params"], y=grp["ratio"], mode="lines+markers", name=name, legendgroup=name,
                                 showlegend=False, text=text, line=dict(color=color)), row=1, col=2)
    fig.update_xaxes(title_text="numbers stored (means + components + coefficients)")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480)
    return fig
