"""report.md of a run, in the layout of the seed report (exp6_report_ja.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .reference import REFERENCE_GPT2_SMALL, is_gpt2_small

__all__ = ["render_report"]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ratio(x: float) -> str:
    """A perplexity ratio with the digits that matter near 1 (1.003x, 4.307x, 44.2x)."""
    return f"{x:.3f}x" if x < 10 else f"{x:.1f}x"


def _gate_outcome(gate: Mapping[str, Any], followed: str | None) -> str:
    """What the gate decided for the model after this one (``followed``: its name, or ``None`` if none was given)."""
    if gate["passed"] is None:
        return "not applied"
    if followed is None:
        return (
            "passed (no further model was given)"
            if gate["passed"]
            else "a next model would not run (none was given)"
        )
    return f"{followed} runs" if gate["passed"] else f"{followed} is skipped"


def _scaled(k: int, n_heads: int) -> int:
    """The report's K for GPT-2 small's 144 heads, scaled to ``n_heads`` (as the default K grid is)."""
    return max(1, int(np.floor(k * n_heads / 144 + 0.5)))


def _patterns(rows: Sequence[Mapping[str, Any]], n_heads: int = 144) -> list[str]:
    """The seed README's predicted outcomes (written for 144 heads; K scaled to ``n_heads``), on the K evaluated."""
    ratio = {int(r["K"]): float(r["ratio"]) for r in rows}
    k10, k16, k32, k64 = (_scaled(k, n_heads) for k in (10, 16, 32, 64))
    mid = {k: v for k, v in ratio.items() if k16 <= k <= k32}

    def mark(ok: bool | None, what: str) -> str:
        return "n/a (K not evaluated)" if ok is None else ("yes" if ok else "no") + f" ({what})"

    best = mark(ratio[k10] <= 1.05 if k10 in ratio else None, f"K={k10}: {ratio.get(k10, float('nan')):.4g}x")
    good_k = min(mid, key=lambda k: mid[k]) if mid else None
    good = mark(
        mid[good_k] <= 1.1 if good_k is not None else None,
        f"best K in {k16}-{k32}: K={good_k}, {mid.get(good_k, float('nan')):.4g}x" if good_k else "",
    )
    poor = mark(ratio[k64] > 1.2 if k64 in ratio else None, f"K={k64}: {ratio.get(k64, float('nan')):.4g}x")
    scaled = "" if n_heads == 144 else f" (the report's K for 144 heads, scaled to {n_heads})"
    return [
        f"best:     K={k10} within 1.05x{scaled}  -> {best}",
        f"good:     K={k16}-{k32} within 1.1x  -> {good}",
        f"mediocre: K={k64} still above 1.2x  -> {poor}",
    ]


def _model_section(
    res: Mapping[str, Any], followed: str | None = None, files: Mapping[str, Mapping[str, str]] | None = None
) -> str:
    ref = REFERENCE_GPT2_SMALL if is_gpt2_small(res) else None
    s = _conditions(res, ref) + _variance_section(res, ref) + _sweep_section(res, ref)
    s += _clustering_section(res, ref) + _map_gate_checks(res, ref, followed) + _files_section(res, files)
    s += _extra_sections(res)
    text = "\n".join(s)
    if res["metadata"].get("circuit") == "ov":  # the same pipeline on OV circuits, edited through W_V
        text = (
            text.replace("W_QK = W_Q.T @ W_K", "W_OV = W_V.T @ W_O.T")
            .replace("|W_Q_new^T W_K - target|", "|W_V_new^T W_O^T - target|")
            .replace("W_QK", "W_OV")
        )
    return text


def _conditions(res: Mapping[str, Any], ref: Mapping[str, Any] | None) -> list[str]:
    """The title, the reference note and the conditions of the run."""
    meta, var = res["metadata"], res["variance"]
    c, proto = meta["model_config"], meta["protocol"]
    n = var["n_heads"]
    started = (res.get("timings", {}).get("runs") or [{}])[0].get("started", "?")
    s: list[str] = [
        f"# Experiment 6: Universal Weight Subspace -- PCA of W_QK and its functional impact ({meta['model']})",
        "",
    ]
    if ref is not None:
        s += [
            (
                "> Columns marked **reference** are the seed report's published GPT-2 small numbers "
                f"({ref['source']}), copied for comparison; they are not results of this run."
            ),
            "",
        ]
    s += [
        "## Conditions",
        "",
        "- **Target**: W_QK = W_Q.T @ W_K (d_head x d_head) of every attention head",
        (
            f"- **Model**: {meta['model']} ({meta['model_source']}): {c['n_layers']} layers x {c['n_heads']} heads = {n} heads, "
            f"d_head={c['d_head']}, key/value heads per layer {c['n_key_value_heads']}"
        ),
        (
            f"- **PCA input**: ({n}, {var['n_features']}) matrix (each W_QK flattened); "
            f"{var['n_nonzero_components']} components with non-zero variance"
        ),
        (
            f"- **Perplexity**: {proto['text']} ({proto['route']}), {proto['n_chunks']} chunks x {proto['ctx']} tokens "
            f"= {proto['n_tokens']:,} tokens"
        ),
        f"- **Device**: {meta['evaluation']['device']} ({meta['evaluation']['dtype']}), batch size {meta['evaluation']['batch_size']}",
        f"- **Date**: {started}",
        "",
        "---",
        "",
        "## 1. Cumulative variance of W_QK (6A)",
        "",
    ]
    return s


def _variance_section(res: Mapping[str, Any], ref: Mapping[str, Any] | None) -> list[str]:
    """6A: components per variance threshold."""
    var = res["variance"]
    n = var["n_heads"]
    s: list[str] = []
    header = ["threshold", "K", f"fraction of all ({n})"]
    if ref is not None:
        header += ["K (reference)", "fraction (reference)"]
    rows = []
    for t in var["thresholds"]:
        r = [f"{100 * t['threshold']:.0f}%", t["K"], f"{100 * t['fraction_of_heads']:.1f}%"]
        if ref is not None:
            rk = ref["variance_thresholds"].get(t["threshold"])
            r += [rk if rk is not None else "-", f"{100 * rk / 144:.1f}%" if rk is not None else "-"]
        rows.append(r)
    s += [_md_table(header, rows), ""]
    top = ", ".join(f"PC{i + 1}={100 * x:.1f}%" for i, x in enumerate(var["top_ratios"]))
    s.append(
        f"Top {len(var['top_ratios'])} components explain {100 * var['top_cumulative']:.1f}% of the variance: {top}."
    )
    if ref is not None:
        s.append(
            f"(reference: {100 * ref['top3_cumulative']:.1f}%: "
            + ", ".join(f"PC{i + 1}={100 * x:.1f}%" for i, x in enumerate(ref["top_ratios"]))
            + ")"
        )
    return s


def _sweep_section(res: Mapping[str, Any], ref: Mapping[str, Any] | None) -> list[str]:
    """6B: perplexity vs K."""
    meta, chk = res["metadata"], res["checks"]
    base = res["baseline"]["ppl"]
    gate_t = meta["gate"]["threshold"]
    ka = chk["k_all"]
    s = [
        "",
        "## 2. Perplexity vs number of components K (6B)",
        "",
        f"Baseline perplexity: **{base:.4g}**" + (f" (reference {ref['baseline_ppl']})" if ref else ""),
        (
            f"K=all ({ka['K']}) check: **{ka['ppl']:.4g}** (ratio {ka['ratio']!r}, |ratio-1| = {ka['abs_ratio_error']:.1e}, "
            f"{'OK' if ka['ok'] else 'FAILED'} at tolerance {ka['tolerance']:g})"
        ),
        "",
    ]
    header = ["K", "cum. variance", "perplexity", "ratio", "95% CI (bootstrap over chunks)", "verdict"]
    if ref is not None:
        header += ["cum. variance (reference)", "perplexity (reference)", "ratio (reference)"]
    rows = []
    for r in res["perplexity_vs_k"]:
        verdict = (
            "baseline (all components)"
            if r["is_all"]
            else (f"within {gate_t}x" if r["ratio"] <= gate_t else "")
        )
        row = [
            r["K"],
            f"{100 * r['cumulative_variance']:.1f}%",
            f"{r['ppl']:.4g}",
            _ratio(r["ratio"]),
            f"[{r['ratio_low']:.3g}, {r['ratio_high']:.3g}]",
            verdict,
        ]
        if ref is not None:
            rv = ref["perplexity_vs_k"].get(r["K"])
            row += [f"{100 * rv[0]:.1f}%", rv[1], _ratio(rv[2])] if rv else ["-", "-", "-"]
        rows.append(row)
    s += [_md_table(header, rows), ""]
    return s


def _n_dims_note(res: Mapping[str, Any]) -> str:
    c = res["metadata"].get("clustering", {})
    if c.get("n_dims_requested", 0) is None and c.get("n_dims") != 20:
        return f" (the default 20, clipped to the PCA's {c['n_dims']} components)"
    return ""


def _clustering_section(res: Mapping[str, Any], ref: Mapping[str, Any] | None) -> list[str]:
    """6C: perplexity with heads replaced by cluster representatives."""
    n = res["variance"]["n_heads"]
    cl = res["clustering"]
    s = [
        "## 3. Head clustering (6C)",
        "",
        f"k-means (n_init={cl['kmeans_n_init']}, seed={cl['seed']}) on the top {cl['n_dims']} PCA coefficients"
        + _n_dims_note(res)
        + "; "
        "the member nearest each centroid represents its cluster and every other member's W_QK is replaced by "
        "the representative's (exact injection)."
        + (f" Dropped k >= {n}: {cl['dropped_k']}." if cl["dropped_k"] else ""),
        "",
    ]
    header = ["k", "replaced heads", "perplexity", "ratio", "95% CI"]
    if ref is not None:
        header += ["replaced (reference)", "perplexity (reference)", "ratio (reference)"]
    rows = []
    for r in cl["rows"]:
        row = [
            r["k"],
            r["replaced"],
            f"{r['ppl']:.4g}",
            _ratio(r["ratio"]),
            f"[{r['ratio_low']:.3g}, {r['ratio_high']:.3g}]",
        ]
        if ref is not None:
            rv = ref["clustering"].get(r["k"])
            row += [rv[0], rv[1], _ratio(rv[2])] if rv else ["-", "-", "-"]
        rows.append(row)
    s += [_md_table(header, rows) if rows else "(no cluster count below the number of heads)", ""]
    return s


def _map_gate_checks(
    res: Mapping[str, Any], ref: Mapping[str, Any] | None, followed: str | None
) -> list[str]:
    """The 2D map, the predicted patterns, the gate and the checks."""
    meta, var, chk = res["metadata"], res["variance"], res["checks"]
    gate_k, gate_t = meta["gate"]["K"], meta["gate"]["threshold"]
    ka = chk["k_all"]
    pm = res["pca_map"]
    layers = np.array([p["layer"] for p in pm], dtype=float)
    pc1 = np.array([p["pc1"] for p in pm])
    r_layer = float(np.corrcoef(layers, pc1)[0, 1]) if layers.std() > 0 and pc1.std() > 0 else float("nan")
    s = [
        "## 4. PCA 2D map",
        "",
        f"The first two components explain {100 * var['pc12_cumulative']:.1f}% of the variance"
        + (f" (reference {100 * ref['pc12_cumulative']:.1f}%)" if ref else "")
        + f". Pearson correlation of PC1 with the layer index: {r_layer:.2f}.",
        "",
        "## 5. The predicted patterns (seed README)",
        "",
        "```",
        *_patterns(res["perplexity_vs_k"], var["n_heads"]),
        "```",
        "",
        "## 6. Gate (6D)",
        "",
        f"Rule: continue to the next (larger) model only if the ratio at K={gate_k} is within {gate_t}x. "
        f"Result: {res['gate']['reason']} -> **{_gate_outcome(res['gate'], followed)}**."
        + (" (reference: K=10 gave 40x, so the report skipped GPT-2 medium)" if ref else ""),
        "",
        "## Checks",
        "",
        f"- K=all ratio: {ka['ratio']!r} ({'OK' if ka['ok'] else 'FAILED'})",
        (
            f"- max injection residual |W_Q_new^T W_K - target|: K sweep {chk['max_injection_residual']['k_sweep']:.2e}, "
            f"clustering {chk['max_injection_residual']['clustering']:.2e}"
        ),
        (
            f"- PCA reconstruction with all components, max abs error: {chk['pca_reconstruction_max_abs_error']:.2e}"
            if chk.get("pca_reconstruction_max_abs_error") is not None
            else "- PCA reconstruction: circuit space (circuits not materialised; see the injection residuals)"
        ),
        "",
    ]
    return s


def _extra_sections(res: Mapping[str, Any]) -> list[str]:
    """Report lines of the optional sections (``--diagnostics``, ``--order importance``)."""
    s: list[str] = []
    m = res["metadata"]["model"]
    if res.get("perplexity_vs_k_importance"):
        imp = res.get("importance") or {}
        s += [
            "## Importance-ordered compression",
            "",
            (
                f"Components ranked by {imp.get('method')} importance (score `{imp.get('score')}`) on "
                f"{res['metadata']['importance']['n_tokens']} tokens not used in the sweep; ranking "
                f"{imp.get('order')}."
            ),
            "",
            *_md_table(
                ["K", "ratio (variance order)", "ratio (importance order)"],
                [
                    [a["K"], _ratio(a["ratio"]), _ratio(b["ratio"])]
                    for a, b in zip(res["perplexity_vs_k"], res["perplexity_vs_k_importance"], strict=False)
                ],
            ).splitlines(),
            "",
            f"Figure: `importance_overlay_{m}.html/.png`.",
            "",
        ]
    if res.get("attention_diagnostics"):
        s += [
            "## Attention diagnostics",
            "",
            *_md_table(
                ["K", "mean KL", "max KL (head)", "mean JS", "top-1 agreement"],
                [
                    [
                        r["K"],
                        f"{r['diag_mean_kl']:.4g}",
                        f"{r['diag_max_kl']:.4g} ({r['diag_max_kl_head']})",
                        f"{r['diag_mean_js']:.4g}",
                        f"{r['diag_mean_top1_agreement']:.3f}",
                    ]
                    for r in res["perplexity_vs_k"]
                    if "diag_mean_kl" in r
                ],
            ).splitlines(),
            "",
            f"Per-head rows in `attention_diagnostics`; figures `diag_*_{m}.html/.png`.",
            "",
        ]
    s += _space_sections(res)
    return s


def _space_sections(res: Mapping[str, Any]) -> list[str]:
    """Report lines of the issue-5 options (``--space``, ``--groupby layer``, ``--baselines``, ``--gauges``)."""
    s: list[str] = []
    meta = res["metadata"]
    m, space = meta["model"], meta.get("space", "raw")
    if space != "raw":
        what = {
            "canonical": "W_QK = W_Q^T W_K with every head in its canonical gauge (`canonical_gauge`)",
            "circuit": (
                "the gauge-invariant circuits C_h = W_Q W_K^T (d_model x d_model; per rotary pair on rotary "
                "models), realised jointly through W_Q and W_K (the best rank-d_head factorisation); the "
                "residuals are the relative Frobenius errors of the realised circuits (largest, mean over heads, "
                "and over all heads)"
            ),
        }
        s += [
            "## PCA space",
            "",
            f"Space **{space}**: variance, K sweep, clustering and map use {what[space]}.",
            "",
        ]
        if space == "circuit":
            s += _circuit_table(res)
    lw = res.get("layerwise")
    if lw and lw.get("per_layer"):
        glob = {int(r["K"]): r for r in lw["global"]}
        per = {int(r["K"]): r for r in lw["per_layer"]}
        s += [
            "## Per-layer PCA vs global PCA",
            "",
            f"Parameter count: {lw['parameter_count']}.",
            "",
            *_md_table(
                [
                    "K per layer",
                    "params",
                    "variance (global mean)",
                    "ratio",
                    "global K",
                    "params",
                    "variance",
                    "ratio",
                ],
                [
                    [
                        p["K_layer"],
                        per[p["K_layer"]]["n_params"],
                        f"{per[p['K_layer']]['global_variance']:.3f}",
                        _ratio(per[p["K_layer"]]["ratio"]),
                        p["K_global"],
                        glob[p["K_global"]]["n_params"],
                        f"{glob[p['K_global']]['global_variance']:.3f}",
                        _ratio(glob[p["K_global"]]["ratio"]),
                    ]
                    for p in lw["matched"]
                    if p["K_layer"] in per and p["K_global"] in glob
                ],
            ).splitlines(),
            "",
            f"Figure: `layerwise_{m}.html/.png`.",
            "",
        ]
    bl = res.get("baselines")
    if bl and bl.get("summary") is not None:
        real = {int(r["K"]): r for r in res["perplexity_vs_k"]}
        s += [
            "## Null baselines",
            "",
            (
                f"Random K-dim subspaces of the span of the centred heads ({meta['baselines']['n_seeds']} seeds per "
                "K) against the top-K principal components; spectrum nulls (shuffled and Gaussian heads, "
                "Marchenko-Pastur) in `baselines.spectrum_nulls`."
            ),
            "",
            *_md_table(
                ["K", "PCA ratio", "random ratio (mean)", "random ratio (min-max)", "random variance (mean)"],
                [
                    [
                        r["K"],
                        _ratio(real[r["K"]]["ratio"]) if r["K"] in real else "",
                        _ratio(r["ratio_mean"]),
                        f"{_ratio(r['ratio_min'])} - {_ratio(r['ratio_max'])}",
                        f"{r['variance_mean']:.3f}",
                    ]
                    for r in bl["summary"]
                ],
            ).splitlines(),
            "",
            f"Figure: `baselines_{m}.html/.png`.",
            "",
        ]
    gs = res.get("gauge_study")
    if gs:
        s += [
            "## Gauge study",
            "",
            (
                f"{gs['config']['n_gauges']} random gauges; baseline perplexity max relative change "
                f"{gs['baseline_max_rel_change']:.2e} ({'OK' if gs['baseline_ok'] else 'NOT unchanged'})."
            ),
            "",
            *_md_table(
                list(gs["spread"][0].keys()) if gs["spread"] else [],
                [[f"{v:.4g}" if isinstance(v, float) else v for v in r.values()] for r in gs["spread"]],
            ).splitlines(),
            "",
            f"Figure: `gauge_{m}.html/.png`.",
            "",
        ]
    return s


def _circuit_table(res: Mapping[str, Any]) -> list[str]:
    """The circuit space's K sweep with the residuals of the realised circuits."""
    return _md_table(
        [
            "K",
            "ratio",
            "max residual",
            "mean residual",
            "total residual",
            "realised (share of norm^2)",
        ],
        [
            [
                r["K"],
                _ratio(r["ratio"]),
                f"{r['max_residual']:.2e}",
                f"{r.get('mean_residual', 0.0):.2e}",
                f"{r.get('residual_total', float('nan')):.2e}",
                f"{100 * (1 - r.get('residual_total', float('nan')) ** 2):.1f}%",
            ]
            for r in res["perplexity_vs_k"]
        ],
    ).splitlines() + [""]


def _files_section(res: Mapping[str, Any], files: Mapping[str, Mapping[str, str]] | None) -> list[str]:
    """The files of the run that exist, and its PNG figures embedded (paths relative to the report)."""
    name = res["metadata"]["model"]
    s = ["## Files", "", f"- `exp6_{name}.json` -- all numbers (clock times only in `timings`)"]
    written = {
        fig: {kind: p for kind, p in paths.items() if Path(p).is_file()}
        for fig, paths in (files or {}).items()
    }
    for fig, paths in written.items():
        if paths:
            s.append(f"- `{fig}`: " + ", ".join(f"`{Path(p).name}`" for p in paths.values()))
    if files is None:
        s.append("- figures: `qs.viz.experiment_figures(results)` rebuilds them from the JSON")
    pngs = [(fig, paths["png"]) for fig, paths in written.items() if "png" in paths]
    if pngs:
        s += ["", "## Figures", ""] + [f"![{fig}]({Path(p).name})" for fig, p in pngs]
    return [*s, ""]


def render_report(
    results: Sequence[Mapping[str, Any]],
    skipped: Sequence[tuple[str, str]] = (),
    files: Sequence[Mapping[str, Mapping[str, str]]] | None = None,
) -> str:
    """report.md for one or more runs (in order) and the models the gate skipped.

    ``files``: per run, ``{figure name: {"html": path, "png": path}}`` as written; the report lists the
    files that exist and embeds the PNGs (paths relative to the report's folder).
    """
    names = [str(r["metadata"]["model"]) for r in results] + [name for name, _ in skipped[:1]]
    parts = [
        _model_section(r, names[i + 1] if i + 1 < len(names) else None, files[i] if files else None)
        for i, r in enumerate(results)
    ]
    if skipped:
        parts.append(
            "# Skipped by the gate\n\n"
            + "\n".join(f"- **{name}**: {reason}" for name, reason in skipped)
            + "\n"
        )
    return "\n---\n\n".join(parts)
