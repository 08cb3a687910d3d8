"""Figures of the attention diagnostics: per-head heatmaps over K, per-layer curves, pattern pairs, the breaking heads."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

__all__ = [
    "figures",
    "plot_breaking_heads_table",
    "plot_head_metric_heatmap",
    "plot_layer_metric_vs_k",
    "plot_pattern_comparison",
]


def _metric_title(metric: str) -> str:
    return {
        "kl": "KL(original || edited) [nats]",
        "js": "Jensen-Shannon divergence [nats]",
        "tv": "total variation",
        "top1_agreement": "top-1 agreement",
    }.get(metric, metric)


#: The heatmap grid shows at most this many K (evenly spread, the largest and smallest always kept).
MAX_HEATMAP_PANELS = 12


def _panel_ks(ks: list[int], most: int) -> list[int]:
    if len(ks) <= most:
        return ks
    idx = np.unique(np.round(np.linspace(0, len(ks) - 1, most)).astype(int))
    return [ks[i] for i in idx]


def plot_head_metric_heatmap(
    df, metric: str = "kl", zmax: float | None = None, columns: int = 4
) -> go.Figure:
    """Layer x head heatmaps of a per-head diagnostics metric, one panel per K on a shared colour scale.

    A static grid (it reads the same in the HTML and the PNG), largest K first.

    Args:
        df: long frame of :func:`qk_subspace.evaluation.diagnostics.diagnostics_sweep` (columns ``K``, ``layer``,
            ``head``, ``metric``), or a single-K frame of ``attention_diagnostics`` (no ``K`` column).
        metric: the column to show (e.g. ``"kl"``, ``"js"``, ``"tv"``, ``"top1_agreement"``).
        zmax: colour-scale maximum shared by all K (default the largest value over all K).
        columns: panels per row.
    """
    from plotly.subplots import make_subplots

    if "K" not in df.columns:
        df = df.assign(K=-1)
    ks = _panel_ks(sorted((int(k) for k in df["K"].unique()), reverse=True), MAX_HEATMAP_PANELS)
    n_layers, n_heads = int(df["layer"].max()) + 1, int(df["head"].max()) + 1
    zmax = float(df[metric].max()) if zmax is None else zmax
    cols = min(columns, len(ks))
    nrows = -(-len(ks) // cols)
    titles = [f"K={k}" if k >= 0 else "" for k in ks]
    fig = make_subplots(
        rows=nrows, cols=cols, subplot_titles=titles, horizontal_spacing=0.04, vertical_spacing=0.08
    )
    for i, k in enumerate(ks):
        sub = df[df["K"] == k]
        z = np.full((n_layers, n_heads), np.nan)
        z[sub["layer"].to_numpy(), sub["head"].to_numpy()] = sub[metric].to_numpy()
        heat = go.Heatmap(
            z=z, x=list(range(n_heads)), y=list(range(n_layers)), zmin=0, zmax=zmax, colorscale="Viridis",
            coloraxis="coloraxis", hovertemplate="L%{y}H%{x}: %{z:.4g}<extra>K=" + str(k) + "</extra>",
        )  # fmt: skip
        fig.add_trace(heat, row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed", title_text="layer", col=1)
    fig.update_xaxes(title_text="head", row=nrows)
    fig.update_layout(
        title=f"{_metric_title(metric)} per head and K (layer x head)",
        coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": zmax, "colorbar": {"title": metric}},
        template="plotly_white",
        width=260 * cols + 120,
        height=230 * nrows + 120,
    )
    return fig


def plot_layer_metric_vs_k(df, metric: str = "kl", log_y: bool = True) -> go.Figure:
    """Per-layer mean of a diagnostics metric (default KL) against K, one line per layer.

    On a log axis a mean of exactly 0 (every head unchanged, e.g. K = all) cannot be drawn: those
    points are left out and listed in the title, instead of being drawn at an arbitrary floor.
    """
    mean = df.groupby(["layer", "K"], as_index=False)[metric].mean()
    fig = go.Figure()
    zero_ks: set[int] = set()
    for layer, sub in mean.groupby("layer"):
        sub = sub.sort_values("K")
        if log_y:
            zero_ks |= {int(k) for k in sub.loc[sub[metric] <= 0, "K"]}
            sub = sub[sub[metric] > 0]
        fig.add_trace(go.Scatter(x=sub["K"], y=sub[metric], mode="lines+markers", name=f"layer {layer}"))
    note = f" (exactly 0, not drawn on the log axis: K={sorted(zero_ks)})" if zero_ks else ""
    fig.update_layout(
        title=f"Per-layer mean {_metric_title(metric)} vs K{note}",
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


def figures(results: dict, metric: str = "kl") -> dict[str, go.Figure]:
    """Figures of a run's ``attention_diagnostics`` section (empty dict if the run had none).

    ``diag_<metric>_heatmap_<model>`` (layer x head, slider over K), ``diag_layer_<metric>_vs_K_<model>``,
    ``diag_output_change_heatmap_<model>`` (relative change of each head's residual write, slider
    over K; the OV circuit's diagnostic) and ``diag_breaking_heads_<model>`` (table).
    """
    import pandas as pd

    from ..evaluation.diagnostics import breaking_heads

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
