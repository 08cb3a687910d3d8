"""The report section of ``qk-subspace compare``: the gauge dependence in numbers, the curves as a table,
the figure. Reads the comparison results document only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pandas as pd

from .markdown import _md_table

__all__ = ["comparison_table", "render_compare_report"]


def comparison_table(comparison: Mapping[str, Any]) -> pd.DataFrame:
    """Ratio per K: raw (gauge 0 and its min-max over gauges), canonical, invariant (with its residual)
    and the random-subspace mean, with the stored values of the raw and invariant reconstructions."""
    t = pd.DataFrame(comparison["table"])
    out = pd.DataFrame(index=sorted(t["K"].unique()))
    out.index.name = "K"
    raw, circ = t[t["curve"] == "raw"], t[t["curve"] == "circuit"]
    g0 = raw[raw["gauge"] == 0].set_index("K")
    out["raw (as loaded)"] = g0["ratio"]
    spread = raw.groupby("K")["ratio"].agg(["min", "max"])
    out["raw over gauges"] = [f"{a:.3g}-{b:.3g}" for a, b in zip(spread["min"], spread["max"], strict=True)]
    can = t[t["curve"] == "canonical"].set_index("K")
    if len(can):
        out["canonical"] = can["ratio"]
    c0 = circ[circ["gauge"] == 0].set_index("K")
    out["invariant"] = c0["ratio"]
    out["invariant max rel. dev."] = circ.groupby("K")["ratio"].agg(
        lambda r: float((r / r.iloc[0] - 1).abs().max())
    )
    out["invariant residual"] = c0["residual_total"]
    rnd = t[t["curve"] == "random"].groupby("K")["ratio"].mean()
    out["random (mean)"] = rnd
    out["stored raw"] = g0["stored_values"]
    out["stored invariant"] = c0["stored_values"]
    return out.reset_index()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if v != v else (f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4g}")
    return str(v)


def render_compare_report(payload: Mapping[str, Any], files: Mapping[str, str] | None = None) -> str:
    """``compare_<model>.md``: a paragraph with the numbers, the table and the figure."""
    meta, comp = payload["metadata"], payload["comparison"]
    cfg = comp["config"]
    table = comparison_table(comp)
    lines = [
        f"# {meta['model']}: is the QK PCA a property of the model?",
        "",
        comp["paragraph"],
        "",
        f"Protocol: {cfg['tokens_shape'][0]} x {cfg['tokens_shape'][1]} tokens ({meta['protocol']['tokens']}), "
        f"{cfg['gauges']} random gauges (seeds {cfg['gauge_seeds']}, condition number <= {cfg['cond']:g}), "
        f"{cfg['seeds']} random subspaces per K. Ratios are perplexity over the unedited model's; the invariant "
        "curve writes each reconstructed circuit into W_Q and W_K jointly (the best rank-d_head factorisation), "
        "its residual is the relative Frobenius error of the realised circuits. Stored values: numbers a "
        f"reconstruction keeps (mean + K components + K coefficients per head; per head {cfg['feature_dims']['raw']} "
        f"raw, {cfg['feature_dims']['circuit']} invariant).",
        "",
        _md_table(list(table.columns), [[_fmt(v) for v in row] for row in table.itertuples(index=False)]),
    ]
    if files:
        shown = files.get("png") or files.get("html")
        if shown:
            rel = os.path.basename(shown)
            lines += ["", f"![comparison]({rel})" if shown.endswith(".png") else f"Figure: [{rel}]({rel})"]
    return "\n".join(lines) + "\n"
