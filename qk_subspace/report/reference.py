"""The seed report's published GPT-2 small numbers (exp6_report_ja.md), transcribed once.

:data:`REFERENCE_GPT2_SMALL` holds the seed report's published GPT-2 small numbers (MPS, 2026-02-19,
WikiText-2 test, 195 x 1024 tokens). They are a *reference* transcribed from the report text, not
results of this package; reports and figures show them side by side only for GPT-2 small.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REFERENCE_GPT2_SMALL", "is_gpt2_small"]

#: The seed report's numbers for GPT-2 small (transcribed from ../shared/seed/exp6_report_ja.md).
#: Reference values only -- never results of a run.
REFERENCE_GPT2_SMALL: dict[str, Any] = {
    "source": "seed report exp6_report_ja.md (GPT-2 small, MPS, 2026-02-19, WikiText-2 test 195 x 1024 tokens)",
    "variance_thresholds": {0.5: 9, 0.8: 54, 0.9: 82, 0.95: 103},
    "top_ratios": (0.177, 0.111, 0.085),
    "top3_cumulative": 0.373,
    "pc12_cumulative": 0.289,
    "baseline_ppl": 29.79,
    "k_all_ppl": 29.79,
    "k_all_abs_diff": 0.000003,
    # K: (cumulative variance, perplexity, ratio)
    "perplexity_vs_k": {
        1: (0.177, 2034.3, 68.3),
        3: (0.373, 1711.0, 57.4),
        10: (0.520, 1200.9, 40.3),
        32: (0.714, 558.3, 18.7),
        64: (0.871, 329.9, 11.1),
        80: (0.910, 250.0, 8.4),
        100: (0.953, 125.3, 4.2),
        110: (0.968, 84.5, 2.8),
        120: (0.982, 70.3, 2.4),
        130: (0.991, 64.2, 2.2),
        140: (0.997, 32.0, 1.07),
        144: (1.0, 29.8, 1.00),
    },
    # k: (replaced heads, perplexity, ratio)
    "clustering": {
        4: (140, 1351.9, 45.4),
        8: (136, 2208.7, 74.2),
        12: (132, 1092.3, 36.7),
        16: (128, 1242.5, 41.7),
        32: (112, 830.4, 27.9),
        64: (80, 482.7, 16.2),
    },
    "gate": {"K": 10, "threshold": 1.1, "ratio": 40.3, "passed": False, "skipped": "gpt2-medium"},
}


def is_gpt2_small(results: Mapping[str, Any]) -> bool:
    """Whether a run is of GPT-2 small (the model the reference numbers are for)."""
    meta = results["metadata"]
    c = meta.get("model_config", {})
    names = {str(meta.get("model", "")).lower(), str(meta.get("model_source", "")).lower()}
    shape_ok = (c.get("n_layers"), c.get("n_heads"), c.get("d_head")) == (12, 12, 64)
    return shape_ok and bool(names & {"gpt2", "gpt2-small", "openai-community/gpt2"})
