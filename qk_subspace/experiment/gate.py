"""The report's gate (6D): the next model of a series runs only if the ratio at K stayed within a threshold."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

__all__ = ["GateResult", "gate_check"]


@dataclass
class GateResult:
    """Outcome of the gate rule: ``passed`` iff the ratio at ``K`` is ``<= threshold``.

    ``passed`` is ``None`` (and ``ratio`` ``None``) when K was not evaluated.
    """

    K: int
    threshold: float
    ratio: float | None
    passed: bool | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gate_check(rows: Any, K: int = 10, threshold: float = 1.1) -> GateResult:
    """Apply the report's gate (GPT-2 medium ran only if K=10 stayed within 1.1x of baseline).

    Args:
        rows: the K sweep, as a DataFrame (``qs.sweep_k``), a list of row dicts, or a results dict.
        K: the K whose ratio is tested.
        threshold: largest acceptable perplexity ratio.
    """
    if isinstance(rows, Mapping):
        rows = rows.get("perplexity_vs_k", [])
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    hits = [r for r in records if int(r["K"]) == int(K)]
    if not hits:
        return GateResult(int(K), float(threshold), None, None, f"K={K} was not evaluated; gate not applied")
    ratio = float(hits[-1]["ratio"])
    passed = ratio <= threshold
    verdict = "within" if passed else "not within"
    return GateResult(
        int(K), float(threshold), ratio, passed, f"ratio at K={K} is {ratio:.3g}x, {verdict} {threshold}x"
    )
