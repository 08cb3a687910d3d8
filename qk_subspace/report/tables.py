"""The report's tables of a results document, as DataFrames and as printed text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

__all__ = ["format_tables", "result_tables"]


def result_tables(results: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """DataFrames ``variance``, ``perplexity_vs_k`` and ``clustering`` of a results document."""
    var = results["variance"]
    n = var["n_heads"]
    vt = pd.DataFrame(
        [
            {
                "threshold": f"{100 * t['threshold']:.0f}%",
                "K": t["K"],
                f"K / {n}": f"{100 * t['fraction_of_heads']:.1f}%",
            }
            for t in var["thresholds"]
        ]
    )
    kt = pd.DataFrame(
        [
            {
                "K": r["K"],
                "cum. variance": f"{100 * r['cumulative_variance']:.1f}%",
                "PPL": r["ppl"],
                "ratio": r["ratio"],
                "95% CI": f"[{r['ratio_low']:.3g}, {r['ratio_high']:.3g}]",
            }
            for r in results["perplexity_vs_k"]
        ]
    )
    ct = pd.DataFrame(
        [
            {
                "k": r["k"],
                "replaced heads": r["replaced"],
                "PPL": r["ppl"],
                "ratio": r["ratio"],
                "95% CI": f"[{r['ratio_low']:.3g}, {r['ratio_high']:.3g}]",
            }
            for r in results["clustering"]["rows"]
        ],
        columns=["k", "replaced heads", "PPL", "ratio", "95% CI"],
    )
    return {"variance": vt, "perplexity_vs_k": kt, "clustering": ct}


def format_tables(results: Mapping[str, Any]) -> str:
    """Plain-text tables of a run (what the CLI prints at the end)."""
    t = result_tables(results)
    meta, var, chk = results["metadata"], results["variance"], results["checks"]
    fmt = {"PPL": lambda x: f"{x:.4g}", "ratio": lambda x: f"{x:.4g}x"}
    lines = [
        (
            f"== {meta['model']}: {var['n_heads']} heads, {meta['protocol']['n_chunks']} chunks x "
            f"{meta['protocol']['ctx']} tokens ({meta['protocol']['text']})"
        ),
        "6A variance: top-3 ratios " + ", ".join(f"{100 * r:.1f}%" for r in var["top_ratios"]),
        t["variance"].to_string(index=False),
        "",
        f"6B perplexity vs K (baseline {results['baseline']['ppl']:.4g})",
        t["perplexity_vs_k"].to_string(index=False, formatters=fmt),
        "",
        "6C clustering (representative replaces its cluster)",
        t["clustering"].to_string(index=False, formatters=fmt)
        if len(t["clustering"])
        else "(no k below n_heads)",
        "",
        (
            f"check K=all: ratio {chk['k_all']['ratio']!r} (|ratio-1| = {chk['k_all']['abs_ratio_error']:.2e}, "
            f"{'OK' if chk['k_all']['ok'] else 'FAILED'} at {chk['k_all']['tolerance']:g}); "
            f"gate: {results['gate']['reason']}"
        ),
    ]
    return "\n".join(lines)
