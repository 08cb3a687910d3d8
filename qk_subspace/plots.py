"""Plotly figures of the experiment, and saving them as self-contained HTML and PNG."""

from __future__ import annotations

import html
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from .report import REFERENCE_GPT2_SMALL

__all__ = [
    "save_figure",
    "png_export_available",
    "plot_head_metric_heatmap",
    "plot_layer_metric_vs_k",
    "plot_pattern_comparison",
    "plot_breaking_heads_table",
    "SEED_REPORT_RATIOS",
    "importance_overlay_figure",
    "head_importance_figure",
    "fig_cumvar",
    "fig_ppl_vs_k",
    "fig_cluster_ppl",
    "fig_cluster_viz",
    "experiment_figures",
    "diagnostics_figures",
    "importance_figures",
    "gauge_figure",
    "baselines_figure",
    "layerwise_figure",
    "space_figures",
]

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
            except Exception as exc:  # noqa: BLE001 - kaleido/Chromium failures must not lose the run
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


# ------------------------------------------------------------------ figures of the experiment
# Each builder takes the results document of qs.run_experiment (or the loaded exp6_<model>.json),
# so figures can be rebuilt from a results file alone.

#: Perplexity-ratio lines drawn on the K sweep (the report's README predictions: 1.05x, 1.1x, 1.2x).
RATIO_THRESHOLDS = (1.05, 1.1, 1.2)


def _circuit_name(results: dict) -> str:
    return "W_OV" if results["metadata"].get("circuit") == "ov" else "W_QK"


def fig_cumvar(results: dict) -> go.Figure:
    """6A: cumulative explained variance vs number of components, with the 50/80/90/95 % marks."""
    var = results["variance"]
    cum = [100 * c for c in var["cumulative_variance"]]
    model = results["metadata"]["model"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=list(range(1, len(cum) + 1)),
            y=cum,
            mode="lines+markers",
            marker={"size": 4},
            name="cumulative",
            hovertemplate="K=%{x}<br>cumulative variance %{y:.2f}%<extra></extra>",
        )
    )
    for t in var["thresholds"]:
        fig.add_hline(y=100 * t["threshold"], line_dash="dot", line_color="grey")
        fig.add_trace(
            go.Scatter(
                x=[t["K"]],
                y=[100 * t["threshold"]],
                mode="markers+text",
                text=[f"{100 * t['threshold']:.0f}%: K={t['K']}"],
                textposition="bottom right",
                marker={"size": 9, "color": "crimson"},
                showlegend=False,
                hovertemplate=f"{100 * t['threshold']:.0f}% needs K={t['K']}<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"6A: cumulative variance of {_circuit_name(results)} across {var['n_heads']} heads ({model})",
        xaxis_title="number of components K",
        yaxis_title="cumulative explained variance (%)",
        yaxis_range=[0, 101],
        template="plotly_white",
        width=800,
        height=500,
    )
    return fig


def _ref_line(fig: go.Figure, x: list, y: float, name: str, dash: str = "dash", color: str = "grey") -> None:
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


def _log_ticks(values: list[float]) -> dict[str, Any]:
    """Readable log-axis ticks (1, 2, 5 x 10^n) covering ``values``; plotly's default labels the
    minor ticks with bare leading digits ("2" for 200)."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v) and v > 0]
    if not vals:
        return {}
    lo, hi = np.floor(np.log10(min(vals))), np.ceil(np.log10(max(vals)))
    ticks = [m * 10.0**e for e in range(int(lo), int(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if min(vals) / 2.5 <= t <= max(vals) * 2.5]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def fig_ppl_vs_k(results: dict, thresholds: tuple[float, ...] = RATIO_THRESHOLDS) -> go.Figure:
    """6B: perplexity vs K (log scale) with CI error bars, ratio on hover, baseline and ratio lines."""
    rows = results["perplexity_vs_k"]
    base = results["baseline"]["ppl"]
    model = results["metadata"]["model"]
    x = [r["K"] for r in rows]
    y = [r["ppl"] for r in rows]
    hi = [base * r["ratio_high"] - r["ppl"] for r in rows]
    lo = [r["ppl"] - base * r["ratio_low"] for r in rows]
    custom = [[r["ratio"], r["ratio_low"], r["ratio_high"], 100 * r["cumulative_variance"]] for r in rows]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="lines+markers",
            name="PCA top-K reconstruction",
            customdata=custom,
            error_y={"type": "data", "array": hi, "arrayminus": lo, "visible": True},
            hovertemplate=(
                "K=%{x}<br>PPL %{y:.4g}<br>ratio %{customdata[0]:.4g}x "
                "[%{customdata[1]:.4g}, %{customdata[2]:.4g}]<br>cumulative variance %{customdata[3]:.1f}%<extra></extra>"
            ),
        )
    )
    _ref_line(fig, x, base, f"baseline {base:.4g}", dash="solid", color="black")
    for t, color in zip(thresholds, ("seagreen", "darkorange", "crimson", "grey", "grey"), strict=False):
        _ref_line(fig, x, base * t, f"{t}x baseline", color=color)
    fig.update_layout(
        title=f"6B: perplexity vs number of kept components K ({model})",
        xaxis_title="K (components kept; K = number of heads means all)",
        yaxis_title="perplexity (log scale)",
        yaxis_type="log",
        template="plotly_white",
        width=800,
        height=500,
    )
    fig.update_yaxes(**_log_ticks(y + [base * max(thresholds, default=1.0)]))
    return fig


def fig_cluster_ppl(results: dict) -> go.Figure:
    """6C: perplexity vs number of clusters k (log scale), replaced heads and ratio on hover."""
    rows = results["clustering"]["rows"]
    base = results["baseline"]["ppl"]
    model = results["metadata"]["model"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[r["k"] for r in rows],
            y=[r["ppl"] for r in rows],
            mode="lines+markers",
            name="cluster representatives",
            customdata=[[r["replaced"], r["ratio"], r["ratio_low"], r["ratio_high"]] for r in rows],
            error_y={
                "type": "data",
                "visible": True,
                "array": [base * r["ratio_high"] - r["ppl"] for r in rows],
                "arrayminus": [r["ppl"] - base * r["ratio_low"] for r in rows],
            },
            hovertemplate=(
                "k=%{x} clusters (%{customdata[0]} heads replaced)<br>PPL %{y:.4g}<br>"
                "ratio %{customdata[1]:.4g}x [%{customdata[2]:.4g}, %{customdata[3]:.4g}]<extra></extra>"
            ),
        )
    )
    _ref_line(fig, [r["k"] for r in rows], base, f"baseline {base:.4g}", dash="solid", color="black")
    fig.update_layout(
        title=f"6C: perplexity with each cluster replaced by its representative ({model})",
        xaxis_title="number of clusters k",
        yaxis_title="perplexity (log scale)",
        yaxis_type="log",
        template="plotly_white",
        width=800,
        height=500,
    )
    fig.update_yaxes(**_log_ticks([r["ppl"] for r in rows] + [base]))
    return fig


def fig_cluster_viz(results: dict) -> go.Figure:
    """2D PCA map of the heads: left coloured by layer, right by cluster (``map_k``)."""
    from plotly.subplots import make_subplots

    rows = results["pca_map"]
    model = results["metadata"]["model"]
    map_k = results["metadata"]["grids"].get("map_k")
    pc = results["variance"]["explained_variance_ratio"]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=(
            "coloured by layer",
            f"coloured by cluster (k={map_k})" if map_k else "no clustering",
        ),
    )
    xs, ys = [r["pc1"] for r in rows], [r["pc2"] for r in rows]
    text = [r["label"] for r in rows]
    hover = "%{text}<br>PC1 %{x:.3g}<br>PC2 %{y:.3g}<br>%{customdata}<extra></extra>"
    n_layers = max(r["layer"] for r in rows) + 1
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            text=text,
            customdata=[f"layer {r['layer']}" for r in rows],
            hovertemplate=hover,
            showlegend=False,
            marker={
                "color": [r["layer"] for r in rows],
                "colorscale": "Viridis",
                "cmin": 0,
                "cmax": max(1, n_layers - 1),
                "size": 8,
                "colorbar": {"title": "layer", "x": 0.44},
                "line": {"width": 0.5, "color": "white"},
            },
        ),
        row=1,
        col=1,
    )
    clusters = sorted({r["cluster"] for r in rows if r["cluster"] is not None})
    for c in clusters:
        sel = [r for r in rows if r["cluster"] == c]
        fig.add_trace(
            go.Scatter(
                x=[r["pc1"] for r in sel],
                y=[r["pc2"] for r in sel],
                mode="markers",
                name=f"cluster {c}",
                text=[r["label"] for r in sel],
                customdata=[f"cluster {c}" for _ in sel],
                hovertemplate=hover,
                marker={"size": 8, "line": {"width": 0.5, "color": "white"}},
            ),
            row=1,
            col=2,
        )
    for col in (1, 2):
        fig.update_xaxes(title_text=f"PC1 ({100 * pc[0]:.1f}%)", row=1, col=col)
        fig.update_yaxes(title_text=f"PC2 ({100 * pc[1]:.1f}%)" if len(pc) > 1 else "PC2", row=1, col=col)
    fig.update_layout(
        title=f"PCA 2D map of the heads' {_circuit_name(results)} ({model})",
        template="plotly_white",
        width=1100,
        height=500,
    )
    return fig


def experiment_figures(results: dict) -> dict[str, go.Figure]:
    """The four figures of a run, keyed by file name (``exp6a_cumvar_<model>``, ...)."""
    m = results["metadata"]["model"]
    return {
        f"exp6a_cumvar_{m}": fig_cumvar(results),
        f"exp6b_ppl_vs_K_{m}": fig_ppl_vs_k(results),
        f"exp6c_cluster_ppl_{m}": fig_cluster_ppl(results),
        f"exp6c_cluster_viz_{m}": fig_cluster_viz(results),
        **diagnostics_figures(results),
        **importance_figures(results),
        **space_figures(results),
    }


def diagnostics_figures(results: dict, metric: str = "kl") -> dict[str, go.Figure]:
    """Figures of a run's ``attention_diagnostics`` section (empty dict if the run had none).

    ``diag_<metric>_heatmap_<model>`` (layer x head, slider over K), ``diag_layer_<metric>_vs_K_<model>``,
    ``diag_output_change_heatmap_<model>`` (relative change of each head's residual write, slider
    over K; the OV circuit's diagnostic) and ``diag_breaking_heads_<model>`` (table).
    """
    import pandas as pd

    from .diagnostics import breaking_heads

    sec = results.get("attention_diagnostics")
    if not sec or not sec.get("rows"):
        return {}
    m = results["metadata"]["model"]
    df = pd.DataFrame(sec["rows"])
    threshold = (sec.get("options") or {}).get("breaking_threshold", 0.1)
    figs = {
        f"diag_{metric}_heatmap_{m}": plot_head_metric_heatmap(df, metric),
        f"diag_layer_{metric}_vs_K_{m}": plot_layer_metric_vs_k(df, metric),
    }
    if "output_change_write" in df.columns:
        figs[f"diag_output_change_heatmap_{m}"] = plot_head_metric_heatmap(df, "output_change_write")
    figs[f"diag_breaking_heads_{m}"] = plot_breaking_heads_table(breaking_heads(df, threshold, metric))
    return figs


def importance_figures(results: dict) -> dict[str, go.Figure]:
    """``importance_overlay_<model>`` of a run with ``order="importance"`` (empty dict otherwise)."""
    import pandas as pd

    rows = results.get("perplexity_vs_k_importance")
    if not rows:
        return {}
    meta = results["metadata"]
    m = meta["model"]
    n = meta["model_config"]["n_layers"] * meta["model_config"]["n_heads"]
    circuit = meta.get("circuit", "qk")
    method = (results.get("importance") or {}).get("method", "")
    return {
        f"importance_overlay_{m}": importance_overlay_figure(
            pd.DataFrame(results["perplexity_vs_k"]),
            pd.DataFrame(rows),
            threshold=meta.get("gate", {}).get("threshold", 1.1),
            reference=SEED_REPORT_RATIOS if circuit == "qk" else None,
            reference_scale=n / 144,
            title=f"{m}, {circuit.upper()}: compression by PCA variance vs by {method} importance",
        )
    }


#: The seed report's 6B table (GPT-2 small, WikiText-2): perplexity ratio at each K of 144, read from
#: :data:`qk_subspace.report.REFERENCE_GPT2_SMALL` (the one place the report's numbers are transcribed).
SEED_REPORT_RATIOS: dict[int, float] = {
    k: ratio for k, (_, _, ratio) in REFERENCE_GPT2_SMALL["perplexity_vs_k"].items()
}


def _sweep_trace(df: Any, name: str, color: str) -> go.Scatter:
    return go.Scatter(
        x=df["K"],
        y=df["ratio"],
        name=name,
        mode="lines+markers",
        line={"color": color},
        error_y={
            "type": "data",
            "symmetric": False,
            "array": df["ratio_high"] - df["ratio"],
            "arrayminus": df["ratio"] - df["ratio_low"],
            "thickness": 1,
        },
        customdata=np.stack([df["cumulative_variance"]], axis=-1),
        hovertemplate="K=%{x}<br>ratio=%{y:.3f}<br>variance kept=%{customdata[0]:.1%}",
    )


def importance_overlay_figure(
    variance_sweep: Any,
    importance_sweep: Any,
    threshold: float = 1.1,
    reference: Mapping[int, float] | None = SEED_REPORT_RATIOS,
    reference_scale: float = 1.0,
    title: str | None = None,
) -> go.Figure:
    """Perplexity ratio vs K for variance-ordered and importance-ordered compression, overlaid.

    Args:
        variance_sweep, importance_sweep: :func:`qk_subspace.sweep_k` results with
            ``order="variance"`` and ``order="importance"`` (columns ``K``, ``ratio``,
            ``ratio_low``, ``ratio_high``, ``cumulative_variance``).
        threshold: a dashed horizontal line at this ratio (default the report's 1.1x goal).
        reference: the seed report's ratios by K (GPT-2 small, variance order), drawn as a grey
            trace; ``None`` omits it.
        reference_scale: multiply the reference K by this (e.g. ``n_heads / 144`` to compare a
            model with ``n_heads`` heads at the same fraction of components).
    """
    fig = go.Figure()
    fig.add_trace(_sweep_trace(variance_sweep, "variance order (top-K PCs)", "#1f77b4"))
    fig.add_trace(_sweep_trace(importance_sweep, "importance order (K most important PCs)", "#d62728"))
    if reference:
        ks = sorted(reference)
        scaled = "" if reference_scale == 1.0 else f", K x {reference_scale:.3g}"
        fig.add_trace(
            go.Scatter(
                x=[k * reference_scale for k in ks],
                y=[reference[k] for k in ks],
                mode="lines+markers",
                name=f"seed report (GPT-2 small, QK, variance order{scaled})",
                line={"color": "grey", "dash": "dot"},
                marker={"symbol": "x"},
            )
        )
    ks_all = list(variance_sweep["K"]) + list(importance_sweep["K"])
    fig.add_trace(
        go.Scatter(  # a trace, not add_hline: hline annotations misplace on log axes
            x=[min(ks_all), max(ks_all)],
            y=[threshold, threshold],
            mode="lines",
            name=f"{threshold:g}x baseline",
            line={"dash": "dash", "color": "black", "width": 1},
        )
    )
    fig.update_yaxes(type="log", title="perplexity ratio to baseline (log)")
    fig.update_xaxes(title="K (components kept)")
    fig.update_layout(
        title=title or "Compression by PCA variance vs by measured importance",
        template="plotly_white",
        width=900,
        height=520,
        legend={"x": 0.4, "y": 0.98},
    )
    return fig


def head_importance_figure(df: Any, column: str = "ratio", title: str | None = None) -> go.Figure:
    """Layer x head heatmap of a :func:`qk_subspace.head_importance` column (default ``ratio``)."""
    from .importance import head_importance_matrix

    z = head_importance_matrix(df, column)
    L, H = z.shape
    text = [[f"L{layer}H{head}<br>{z[layer, head]:.4g}" for head in range(H)] for layer in range(L)]
    mode = df.attrs.get("mode", "only")
    what = "compress only this head" if mode == "only" else "compress all heads but this one"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"H{h}" for h in range(H)],
            y=[f"L{layer}" for layer in range(L)],
            colorscale="Viridis",
            text=text,
            texttemplate="%{text}",
            hovertemplate="%{text}<extra></extra>",
            colorbar={"title": column},
        )
    )
    fig.update_yaxes(autorange="reversed")
    k = df.attrs.get("K")
    fig.update_layout(
        title=title or f"Head-level importance ({df.attrs.get('circuit', 'qk').upper()}, {what}, K={k})",
        template="plotly_white",
        width=120 + 70 * H,
        height=160 + 60 * L,
    )
    return fig


def _metric_title(metric: str) -> str:
    return {
        "kl": "KL(original || edited) [nats]",
        "js": "Jensen-Shannon divergence [nats]",
        "tv": "total variation",
        "top1_agreement": "top-1 agreement",
    }.get(metric, metric)


def plot_head_metric_heatmap(
    df, metric: str = "kl", active_k: int | None = None, zmax: float | None = None
) -> go.Figure:
    """Layer x head heatmap of a per-head diagnostics metric, one frame per K with a slider.

    Args:
        df: long frame of :func:`qk_subspace.diagnostics_sweep` (columns ``K``, ``layer``, ``head``,
            ``metric``), or a single-K frame of ``attention_diagnostics`` (no ``K`` column).
        metric: the column to show (e.g. ``"kl"``, ``"js"``, ``"tv"``, ``"top1_agreement"``).
        active_k: the K shown first (and in the PNG); default the smallest K.
        zmax: colour-scale maximum shared by all K (default the largest value over all K).
    """
    import numpy as np

    if "K" not in df.columns:
        df = df.assign(K=-1)
    ks = sorted(int(k) for k in df["K"].unique())
    n_layers, n_heads = int(df["layer"].max()) + 1, int(df["head"].max()) + 1
    zmax = float(df[metric].max()) if zmax is None else zmax
    active = ks.index(active_k) if active_k is not None else 0
    fig = go.Figure()
    for i, k in enumerate(ks):
        sub = df[df["K"] == k]
        z = np.full((n_layers, n_heads), np.nan)
        z[sub["layer"].to_numpy(), sub["head"].to_numpy()] = sub[metric].to_numpy()
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(n_heads)),
                y=list(range(n_layers)),
                zmin=0,
                zmax=zmax,
                colorscale="Viridis",
                visible=i == active,
                colorbar={"title": metric},
                hovertemplate="L%{y}H%{x}: %{z:.4g}<extra>K=" + str(k) + "</extra>",
            )
        )
    steps = [
        {
            "method": "update",
            "label": str(k),
            "args": [
                {"visible": [j == i for j in range(len(ks))]},
                {"title": f"{_metric_title(metric)} per head, K={k}"},
            ],
        }
        for i, k in enumerate(ks)
    ]
    fig.update_layout(
        title=f"{_metric_title(metric)} per head, K={ks[active]}",
        xaxis_title="head",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        sliders=[{"active": active, "currentvalue": {"prefix": "K = "}, "steps": steps}],
        template="plotly_white",
    )
    return fig


def plot_layer_metric_vs_k(df, metric: str = "kl", log_y: bool = True) -> go.Figure:
    """Per-layer mean of a diagnostics metric (default KL) against K, one line per layer."""
    mean = df.groupby(["layer", "K"], as_index=False)[metric].mean()
    fig = go.Figure()
    for layer, sub in mean.groupby("layer"):
        sub = sub.sort_values("K")
        y = sub[metric].clip(lower=1e-12) if log_y else sub[metric]
        fig.add_trace(go.Scatter(x=sub["K"], y=y, mode="lines+markers", name=f"layer {layer}"))
    fig.update_layout(
        title=f"Per-layer mean {_metric_title(metric)} vs K",
        xaxis_title="K (PCA components kept)",
        yaxis_title=f"mean {metric}",
        yaxis_type="log" if log_y else "linear",
        template="plotly_white",
    )
    return fig


def plot_pattern_comparison(pairs, token_labels, titles: dict | None = None) -> go.Figure:
    """Side-by-side attention heatmaps, original (left) vs edited (right), one row per head.

    Args:
        pairs: ``{(layer, head): (original [pos, pos], edited [pos, pos])}`` from
            :func:`qk_subspace.head_patterns`.
        token_labels: ``pos`` token strings for the axes (keys on x, queries on y).
        titles: optional extra text per head, e.g. ``{(l, h): "KL=0.8"}``.
    """
    from plotly.subplots import make_subplots

    heads = list(pairs)
    if not heads:
        raise ValueError("pairs is empty: pass head_patterns(...) for at least one head")
    pos = pairs[heads[0]][0].shape[-1]
    if len(token_labels) != pos:
        raise ValueError(f"token_labels: {len(token_labels)} labels for patterns over {pos} positions")
    # plotly tick text is HTML: escape tokens such as "<s>"; show newlines and bare spaces
    labels = [
        html.escape(str(t).replace("\n", "\\n"), quote=False) if str(t).strip() else repr(str(t))
        for t in token_labels
    ]
    ticks = list(range(pos))
    sub_titles = []
    for layer, head in heads:
        extra = f" ({titles[(layer, head)]})" if titles and (layer, head) in titles else ""
        sub_titles += [f"L{layer}H{head} original", f"L{layer}H{head} edited{extra}"]
    fig = make_subplots(
        rows=len(heads),
        cols=2,
        subplot_titles=sub_titles,
        horizontal_spacing=0.1,
        vertical_spacing=0.25 / max(len(heads), 1),
    )
    for r, key in enumerate(heads, start=1):
        for c, mat in enumerate(pairs[key], start=1):
            # numeric axes with token tick labels (categorical axes would merge repeated tokens)
            fig.add_trace(
                go.Heatmap(
                    z=mat,
                    x=ticks,
                    y=ticks,
                    zmin=0,
                    zmax=1,
                    colorscale="Blues",
                    showscale=(r == 1 and c == 2),
                    customdata=[[(labels[i], labels[j]) for j in ticks] for i in ticks],
                    hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>%{z:.3f}<extra></extra>",
                ),
                row=r,
                col=c,
            )
            fig.update_yaxes(
                autorange="reversed",
                tickmode="array",
                tickvals=ticks,
                ticktext=labels,
                tickfont={"size": 8},
                row=r,
                col=c,
            )
            fig.update_xaxes(
                tickmode="array",
                tickvals=ticks,
                ticktext=labels,
                tickfont={"size": 8},
                tickangle=-90,
                row=r,
                col=c,
            )
    fig.update_layout(
        height=max(480, 470 * len(heads)),
        width=1000,
        template="plotly_white",
        title="Attention patterns: original vs edited (rows: query, columns: key)",
    )
    return fig


def plot_breaking_heads_table(table) -> go.Figure:
    """A plotly Table of :func:`qk_subspace.breaking_heads` (numbers to 4 significant digits)."""
    cols = list(table.columns)
    cells = [[f"{v:.4g}" if isinstance(v, float) else v for v in table[c]] for c in cols]
    fig = go.Figure(go.Table(header={"values": cols, "fill_color": "#dde"}, cells={"values": cells}))
    thr = table.attrs.get("threshold")
    k = table.attrs.get("K_break")
    title = "Heads that break first" + (
        f" ({table.attrs.get('metric')} > {thr:g} at K={k})" if thr is not None else ""
    )
    fig.update_layout(title=title, template="plotly_white")
    return fig


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
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("cumulative explained variance", "perplexity ratio (log)")
    )
    for (space, gauge), grp in table.groupby(["space", "gauge"], sort=True):
        color = _SPACE_COLORS.get(str(space), "#333333")
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


def baselines_figure(
    nulls: Any,
    real_sweep: Any = None,
    random_sweep: Any = None,
    title: str = "Real PCA vs null baselines",
) -> go.Figure:
    """Variance curve with spectrum nulls (left) and PPL ratio vs K with the random-subspace band (right).

    Args:
        nulls: :func:`qk_subspace.baselines.spectrum_nulls` table.
        real_sweep: a :func:`sweep_space` / ``sweep_k`` table (K, ratio) of the real PCA.
        random_sweep: a :func:`qk_subspace.baselines.random_subspace_sweep` table.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("cumulative explained variance", "perplexity ratio (log)")
    )
    styles = {
        "real": ("#000000", "solid"),
        "shuffled": ("#ff7f0e", "dash"),
        "gaussian": ("#2ca02c", "dash"),
        "random_subspace": ("#7f7f7f", "dot"),
        "marchenko_pastur": ("#9467bd", "dashdot"),
    }
    for curve, grp in nulls.groupby("curve", sort=False):  # type: ignore[attr-defined]
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
    if real_sweep is not None:
        fig.add_trace(
            go.Scatter(
                x=real_sweep["K"],
                y=real_sweep["ratio"],
                mode="lines+markers",
                name="real PCA",
                line=dict(color="#000000"),
            ),
            row=1,
            col=2,
        )
    if random_sweep is not None:
        agg = random_sweep.groupby("K")["ratio"].agg(["mean", "min", "max"]).reset_index()  # type: ignore[attr-defined]
        fig.add_trace(
            go.Scatter(
                x=agg["K"], y=agg["max"], mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip"
            ),
            row=1,
            col=2,
        )
        fig.add_trace(
            go.Scatter(
                x=agg["K"],
                y=agg["min"],
                mode="lines",
                line=dict(width=0),
                fill="tonexty",
                fillcolor="rgba(127,127,127,0.25)",
                name="random subspace (min-max)",
            ),
            row=1,
            col=2,
        )
        fig.add_trace(
            go.Scatter(
                x=agg["K"],
                y=agg["mean"],
                mode="lines+markers",
                name="random subspace (mean)",
                line=dict(color="#7f7f7f", dash="dot"),
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="K (components kept)")
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480)
    return fig


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


def space_figures(results: dict) -> dict[str, go.Figure]:
    """Figures of a run's issue-5 sections (empty dict if it had none): ``baselines_<model>``
    (``--baselines``), ``layerwise_<model>`` (``--groupby layer``) and ``gauge_<model>`` (``--gauges``)."""
    import types

    import pandas as pd

    m = results["metadata"]["model"]
    space = results["metadata"].get("space", "raw")
    figs: dict[str, go.Figure] = {}
    bl = results.get("baselines")
    if bl and bl.get("spectrum_nulls"):
        rand = pd.DataFrame(bl["random_subspace"]) if bl.get("random_subspace") else None
        figs[f"baselines_{m}"] = baselines_figure(
            pd.DataFrame(bl["spectrum_nulls"]),
            pd.DataFrame(results["perplexity_vs_k"]),
            rand,
            title=f"{m}, {space} space: real PCA vs null baselines",
        )
    lw = results.get("layerwise")
    if lw and lw.get("per_layer"):
        per_layer = pd.DataFrame(lw["per_layer"])
        glob = {int(r["K"]): r for r in lw["global"]}
        rows = [
            dict(glob[p["K_global"]], K_layer=p["K_layer"]) for p in lw["matched"] if p["K_global"] in glob
        ]
        table = pd.concat([per_layer.assign(K_layer=per_layer["K"]), pd.DataFrame(rows)], ignore_index=True)
        figs[f"layerwise_{m}"] = layerwise_figure(
            table, title=f"{m}, {space} space: per-layer vs global PCA at equal parameter count"
        )
    gs = results.get("gauge_study")
    if gs and gs.get("table"):
        figs[f"gauge_{m}"] = gauge_figure(
            types.SimpleNamespace(table=pd.DataFrame(gs["table"])),
            title=f"{m}: gauge dependence of the QK PCA",
        )
    return figs
