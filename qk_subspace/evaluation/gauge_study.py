"""How much of the PCA result is a property of the heads and how much of their coordinates?

:func:`gauge_study` re-runs the analysis under several random model-preserving gauges
(:func:`~qk_subspace.edits.gauge.random_gauge`): the baseline perplexity must not move (checked to
``BASELINE_RTOL``); the raw ``W_Q^T W_K`` variance curve and PPL-vs-K curve do move; the
circuit-space ones (the ``"qk-circuit"`` representation) must not, up to round-off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..edits.gauge import gauged
from ..representations import for_circuit_and_space
from .perplexity import perplexity
from .sweeps import sweep

__all__ = ["BASELINE_RTOL", "GaugeStudy", "gauge_study"]

#: The baseline perplexity under a gauge must equal the original within this relative tolerance.
BASELINE_RTOL = 1e-5


@dataclass
class GaugeStudy:
    """Result of :func:`gauge_study`.

    Attributes:
        table: long DataFrame, one row per (gauge, space, K): ``gauge`` (0 = the model as loaded,
            1.. = random gauges), ``gauge_seed``, ``space``, ``K``, ``cumulative_variance``,
            ``ppl``, ``ratio``, ``ratio_low``, ``ratio_high``, ``max_residual``, ``baseline_ppl``.
        baselines: ``{gauge: baseline perplexity}``; baseline_max_rel_change: max over gauges of
            ``|ppl_g / ppl_0 - 1|``; baseline_ok: it is below ``BASELINE_RTOL``.
        spread: per space and K, min / max / mean / std over gauges of ``ratio`` and
            ``cumulative_variance`` and the max relative deviation from gauge 0.
        config: the study's parameters (ks, n_gauges, cond, seed, tokens shape, model name).
    """

    table: pd.DataFrame
    baselines: dict[int, float]
    baseline_max_rel_change: float
    baseline_ok: bool
    spread: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict: config, baselines, spread and the full table."""
        return {
            "config": self.config,
            "baselines": {str(k): v for k, v in self.baselines.items()},
            "baseline_max_rel_change": self.baseline_max_rel_change,
            "baseline_ok": self.baseline_ok,
            "spread": self.spread.to_dict(orient="records"),
            "table": self.table.to_dict(orient="records"),
        }

    def to_json(self, path: str | os.PathLike) -> str:
        """Write :meth:`summary` as JSON; returns the path."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.summary(), indent=2, default=float))
        return str(path)


def _spread(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (space, K), grp in table.groupby(["space", "K"]):
        ref = grp[grp["gauge"] == 0]
        r0 = float(ref["ratio"].iloc[0]) if len(ref) else float("nan")
        v0 = float(ref["cumulative_variance"].iloc[0]) if len(ref) else float("nan")
        ratio, var = grp["ratio"].to_numpy(), grp["cumulative_variance"].to_numpy()
        rows.append(
            {
                "space": space,
                "K": int(K),
                "n_gauges": len(grp),
                "ratio_min": float(ratio.min()),
                "ratio_max": float(ratio.max()),
                "ratio_mean": float(ratio.mean()),
                "ratio_std": float(ratio.std(ddof=1)) if len(grp) > 1 else 0.0,
                "ratio_max_rel_dev": float(np.max(np.abs(ratio / r0 - 1))),
                "variance_min": float(var.min()),
                "variance_max": float(var.max()),
                "variance_max_abs_dev": float(np.max(np.abs(var - v0))),
            }
        )
    return pd.DataFrame(rows)


def gauge_study(
    model: Any,
    tokens: torch.Tensor,
    ks: Sequence[int],
    n_gauges: int = 3,
    *,
    cond: float = 10.0,
    seed: int = 1,
    spaces: Sequence[str] = ("raw", "circuit"),
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 1000,
) -> GaugeStudy:
    """Variance and PPL-vs-K curves of each space for the model as loaded and under random gauges.

    Args:
        ks: K grid (global PCA; 0 = mean head).
        n_gauges: number of random gauges (seeds ``seed, seed+1, ...``); gauge 0 is the model as loaded.
        cond: condition-number bound of every random G.
        spaces: any of ``"raw"``, ``"canonical"``, ``"circuit"``.

    Cost: ``(n_gauges + 1) * (1 + len(spaces) * len(ks))`` perplexity evaluations.
    """
    if isinstance(n_gauges, bool) or not isinstance(n_gauges, int) or n_gauges < 1:
        raise ValueError(f"n_gauges must be a positive integer, got {n_gauges!r}")
    rows: list[pd.DataFrame] = []
    baselines: dict[int, float] = {}
    gauges = [None] + [seed + i for i in range(n_gauges)]
    for g, gseed in enumerate(tqdm(gauges, desc="gauges", disable=not progress)):
        with gauged(model, gseed, cond):
            base = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc=f"baseline g{g}")
            baselines[g] = base.ppl
            for space in spaces:
                # the representation's context (canonical_gauge) applies on top of the random gauge
                rep = for_circuit_and_space("qk", space)
                df = sweep(
                    model, tokens, ks, representation=rep, baseline=base, batch_size=batch_size,
                    progress=progress, n_boot=n_boot,
                )  # fmt: skip
                df.insert(0, "gauge", g)
                df.insert(1, "gauge_seed", -1 if gseed is None else gseed)
                df["baseline_ppl"] = base.ppl
                rows.append(df)
    table = pd.concat(rows, ignore_index=True)
    rel = max(abs(v / baselines[0] - 1.0) for v in baselines.values())
    return GaugeStudy(
        table=table,
        baselines=baselines,
        baseline_max_rel_change=float(rel),
        baseline_ok=bool(rel < BASELINE_RTOL),
        spread=_spread(table),
        config={
            "ks": [int(k) for k in ks],
            "n_gauges": n_gauges,
            "cond": cond,
            "seed": seed,
            "spaces": list(spaces),
            "tokens_shape": list(tokens.shape),
            "model": str(getattr(model, "qk_subspace_source", model.cfg.model_name)),
        },
    )
