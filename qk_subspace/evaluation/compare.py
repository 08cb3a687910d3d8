"""Raw, canonical and gauge-invariant PCA of the QK circuit on one model, side by side:
:func:`compare_spaces` (the library side of ``qk-subspace compare``).

Curves (every row of :attr:`SpaceComparison.table` is one point of one curve):

* ``raw``: the report's method, PCA of ``W_Q^T W_K``, for the model as loaded (gauge 0) and under
  ``gauges`` random model-preserving gauges (:func:`~qk_subspace.edits.gauge.random_gauge`): its spread
  over gauges is a property of the coordinates, not of the model;
* ``canonical``: the same in the canonical gauge (:func:`~qk_subspace.edits.gauge.canonical_gauge`);
* ``circuit``: the gauge-invariant circuit (``"qk-circuit"``, per rotary pair on rotary models) with
  the joint realisation, under the same gauges (identical curves up to round-off);
* ``random``: the null band, ``seeds`` random K-dimensional subspaces of the circuits' span per K;
* K = 0 of each curve is the mean-head line.

Columns: ``curve``, ``space``, ``K``, ``gauge`` (0 = as loaded), ``gauge_seed`` (-1 for gauge 0),
``seed`` (random subspaces; -1 otherwise), ``ratio``, ``ratio_low``, ``ratio_high``, ``ppl``,
``stored_values`` (numbers the reconstruction stores in that space's own units: mean + K components +
K coefficients per head, :func:`~qk_subspace.decomposition.storage.pca_parameter_count`),
``cumulative_variance``, ``max_residual``, ``residual_total`` (circuit rows: the relative Frobenius
residual of the realised circuits; ``NaN`` elsewhere) and ``baseline_ppl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..edits.gauge import gauged
from ..representations import get
from .perplexity import PerplexityResult, perplexity
from .sweeps import random_subspace_sweep, sweep

__all__ = ["BASELINE_RTOL", "CURVES", "SpaceComparison", "compare_spaces", "comparison_points"]

#: The curves of a comparison, in drawing order.
CURVES = ("raw", "canonical", "circuit", "random")
#: The paragraph reports the raw spread where the raw curve (as loaded) is within this ratio of the model.
USABLE_RATIO = 10.0
#: The baseline perplexity under a gauge must equal the original within this relative tolerance.
BASELINE_RTOL = 1e-5
_COLUMNS = (
    "curve", "space", "K", "gauge", "gauge_seed", "seed", "ratio", "ratio_low", "ratio_high", "ppl",
    "stored_values", "cumulative_variance", "max_residual", "residual_total", "baseline_ppl",
)  # fmt: skip
_REPRESENTATION = {"raw": "qk", "canonical": "qk-canonical", "circuit": "qk-circuit", "random": "qk-circuit"}


def comparison_points(n_gauges: int) -> list[tuple[str, int]]:
    """The ``(curve, gauge)`` points of a comparison, in the order they are run (the resume keys)."""
    gauges = range(n_gauges + 1)
    return (
        [("raw", g) for g in gauges] + [("canonical", 0)] + [("circuit", g) for g in gauges] + [("random", 0)]
    )


@dataclass
class SpaceComparison:
    """Result of :func:`compare_spaces`.

    Attributes:
        table: one row per curve point (see the module docstring).
        baselines: ``{gauge: baseline perplexity}``; baseline_max_rel_change: max ``|ppl_g / ppl_0 - 1|``.
        config: the comparison's parameters (ks, gauges, seeds, cond, gauge seeds, tokens shape, model).
    """

    table: pd.DataFrame
    baselines: dict[int, float]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline_max_rel_change(self) -> float:
        b0 = self.baselines[0]
        return float(max(abs(v / b0 - 1.0) for v in self.baselines.values()))

    def spread(self) -> pd.DataFrame:
        """Per curve (raw, circuit) and K: the ratio under each gauge, ``max / min`` and the max relative
        deviation from gauge 0."""
        rows = []
        for (curve, K), grp in self.table[self.table["curve"].isin(["raw", "circuit"])].groupby(
            ["curve", "K"]
        ):
            r = grp.sort_values("gauge")["ratio"].to_numpy()
            rows.append(
                {
                    "curve": curve,
                    "K": int(K),
                    "ratios": [float(x) for x in r],
                    "max_over_min": float(r.max() / r.min()),
                    "max_rel_dev": float(np.max(np.abs(r / r[0] - 1.0))),
                }
            )
        return pd.DataFrame(rows)

    def headline(self) -> dict[str, Any]:
        """The numbers of the paragraph: ``raw``, the K with the widest spread over gauges among those where
        the raw curve as loaded is within :data:`USABLE_RATIO` of the model (``raw_largest``: over all K);
        the invariant curve's ratio at that K and its largest deviation over gauges; the smallest K at
        which the invariant curve is as good as raw's gauge-0 ratio there."""
        sp = self.spread()
        raw, circ = sp[sp["curve"] == "raw"], sp[sp["curve"] == "circuit"]
        out: dict[str, Any] = {"baseline_max_rel_change": self.baseline_max_rel_change}
        if len(raw):
            usable = raw[[r[0] <= USABLE_RATIO for r in raw["ratios"]]]
            for key, rows in (("raw_largest", raw), ("raw", usable if len(usable) else raw)):
                worst = rows.loc[rows["max_over_min"].idxmax()]
                out[key] = {
                    "K": int(worst["K"]),
                    "ratios": worst["ratios"],
                    "max_over_min": worst["max_over_min"],
                }
        if len(circ):
            out["circuit_max_rel_dev"] = float(circ["max_rel_dev"].max())
            g0 = self.table[(self.table["curve"] == "circuit") & (self.table["gauge"] == 0)].set_index("K")
            K = out["raw"]["K"] if "raw" in out and out["raw"]["K"] in g0.index else int(g0.index[0])
            out["circuit"] = {
                "K": K,
                "ratio": float(g0.loc[K, "ratio"]),
                "residual_total": float(g0.loc[K, "residual_total"]),
            }
            if "raw" in out:  # the smallest K at which the invariant curve is as good as raw at gauge 0
                good = g0.index[g0["ratio"] <= out["raw"]["ratios"][0] * (1 + 1e-12)]
                out["circuit_matches_raw_at_K"] = int(good.min()) if len(good) else None
        return out

    def paragraph(self) -> str:
        """The gauge dependence in numbers, one paragraph (the report's and the CLI's text)."""
        h = self.headline()
        n = int(self.config.get("gauges", 0))
        parts = []
        if "raw" in h:
            r = h["raw"]
            ratios = ", ".join(f"{x:.3g}x" for x in r["ratios"])
            parts.append(
                f"Raw W_Q^T W_K PCA at K={r['K']}: {ratios} under gauges 0-{n} (gauge 0 = the model as loaded; "
                f"a {r['max_over_min']:.3g}-fold spread), although every gauge leaves the model's perplexity "
                f"unchanged (largest relative change {h['baseline_max_rel_change']:.1e})."
            )
        if "circuit" in h:
            c = h["circuit"]
            match = h.get("circuit_matches_raw_at_K")
            parts.append(
                f"Gauge-invariant circuit PCA (joint W_Q/W_K realisation): {c['ratio']:.3g}x at K={c['K']} for "
                f"every gauge (largest relative deviation of the invariant curve over all K and gauges: "
                f"{h['circuit_max_rel_dev']:.1e}); the realised circuits miss their targets by "
                f"{c['residual_total']:.3g} (relative Frobenius residual) at that K."
                + (
                    f" The invariant curve is as low as raw's gauge-0 ratio from K={match} on."
                    if match is not None
                    else ""
                )
            )
        return " ".join(parts)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict: config, baselines, headline numbers, paragraph, spread and the full table."""
        return {
            "config": self.config,
            "baselines": {str(k): v for k, v in self.baselines.items()},
            "baseline_max_rel_change": self.baseline_max_rel_change,
            "headline": self.headline(),
            "paragraph": self.paragraph(),
            "spread": self.spread().to_dict(orient="records"),
            "table": self.table.to_dict(orient="records"),
        }

    @property
    def figure(self) -> Any:
        """The plotly figure: ratio vs K and ratio vs stored values, every curve and band."""
        from ..viz.compare import comparison_figure

        return comparison_figure(
            self.table, title=f"{self.config.get('model', 'model')}: raw vs invariant QK PCA"
        )

    def to_json(self, path: str | os.PathLike) -> str:
        """Write :meth:`summary` as JSON; returns the path."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.summary(), indent=2, default=float))
        return str(path)


def compare_spaces(
    model: Any,
    tokens: torch.Tensor,
    ks: Sequence[int] | None = None,
    gauges: int = 3,
    seeds: int = 3,
    *,
    cond: float = 10.0,
    gauge_seed: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 1000,
    done: Mapping[str, list[dict[str, Any]]] | None = None,
    on_point: Callable[[str, list[dict[str, Any]], dict[int, float]], None] | None = None,
) -> SpaceComparison:
    """Run the curves of the module docstring on ``model`` and ``tokens`` ``[n_chunks, ctx]``.

    Args:
        ks: K grid (default: every K up to 8, then 4 more up to K = all, :func:`default_compare_ks`); 0 and K = all are added.
        gauges: random gauges (seeds ``gauge_seed, gauge_seed + 1, ...``) besides the model as loaded.
        seeds: random subspaces per K for the null band.
        cond: condition-number bound of every random gauge.
        done: finished points ``{"raw/g0": rows, ...}`` to reuse (resuming); on_point: called with
            ``(key, rows, baselines)`` after every point.

    Cost: ``(gauges + 1) * (1 + 2 len(ks)) + (1 + seeds) * len(ks)`` perplexity evaluations.
    """
    for name, value, low in (("gauges", gauges, 0), ("seeds", seeds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    n = int(model.cfg.n_layers * model.cfg.n_heads)
    grid = default_compare_ks(n) if ks is None else sorted({0, n, *(int(k) for k in ks)})
    if grid[0] < 0 or grid[-1] > n:
        raise ValueError(f"ks must lie in [0, {n}] (K = all is {n}), got {list(ks or [])}")
    feature_dim = {rep: get(rep).heads(model).feature_dim for rep in ("qk", "qk-circuit")}  # canonical: as qk
    dims = {
        curve: feature_dim["qk" if rep == "qk-canonical" else rep] for curve, rep in _REPRESENTATION.items()
    }
    done = dict(done or {})
    baselines: dict[int, float] = {}
    tables: list[pd.DataFrame] = []
    common: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "n_boot": n_boot}
    base_cache: dict[int, PerplexityResult] = {}
    for curve, g in tqdm(comparison_points(gauges), desc="compare", disable=not progress):
        key = f"{curve}/g{g}"
        gseed = None if g == 0 else gauge_seed + g - 1
        if key in done:
            rows = done[key]
            baselines[g] = float(rows[0]["baseline_ppl"])
        else:
            with gauged(model, gseed, cond):
                if g not in base_cache:
                    base_cache[g] = perplexity(
                        model, tokens, batch_size=batch_size, progress=progress, desc=f"baseline g{g}"
                    )
                base = base_cache[g]
                baselines[g] = base.ppl
                if curve == "random":
                    df = random_subspace_sweep(
                        model, tokens, [k for k in grid if 0 < k < n], representation="qk-circuit", n_seeds=seeds,
                        seed=0, baseline=base, **common,
                    )  # fmt: skip
                    df["cumulative_variance"] = df.pop("variance")
                else:
                    df = sweep(
                        model, tokens, grid, representation=_REPRESENTATION[curve], baseline=base, **common
                    )
            rows = _rows(df, curve, g, -1 if gseed is None else gseed, base.ppl)
            if on_point is not None:
                on_point(key, rows, dict(baselines))
        tables.append(pd.DataFrame(rows))
    table = pd.concat(tables, ignore_index=True)
    config = {
        "ks": grid,
        "gauges": gauges,
        "seeds": seeds,
        "cond": cond,
        "gauge_seeds": [gauge_seed + i for i in range(gauges)],
        "tokens_shape": list(tokens.shape),
        "feature_dims": {k: int(v) for k, v in dims.items()},
        "model": str(getattr(model, "qk_subspace_source", model.cfg.model_name)),
    }
    return SpaceComparison(table=table, baselines=baselines, config=config)


def _rows(df: pd.DataFrame, curve: str, gauge: int, gseed: int, base: float) -> list[dict[str, Any]]:
    """The comparison rows of one sweep frame, in :data:`_COLUMNS` order (plain Python values)."""
    out = []
    for rec in df.to_dict(orient="records"):
        row = {
            "curve": curve,
            "space": str(rec["space"]),
            "K": int(rec["K"]),
            "gauge": gauge,
            "gauge_seed": gseed,
            "seed": int(rec.get("seed", -1)),
            "ratio": float(rec["ratio"]),
            "ratio_low": float(rec["ratio_low"]),
            "ratio_high": float(rec["ratio_high"]),
            "ppl": float(rec["ppl"]),
            "stored_values": int(rec["stored_values"]),
            "cumulative_variance": float(rec.get("cumulative_variance", float("nan"))),
            "max_residual": float(rec.get("max_residual", float("nan"))),
            "residual_total": float(rec.get("residual_total", float("nan"))),
            "baseline_ppl": float(base),
        }
        out.append({c: row[c] for c in _COLUMNS})
    return out


def default_compare_ks(n_heads: int) -> list[int]:
    """Every K up to 8, then 4 more, log-spaced, up to K = all (``n_heads``): 13 points for 40 heads."""
    small = list(range(min(n_heads, 8) + 1))
    if n_heads <= 8:
        return small
    more = np.unique(np.round(np.geomspace(min(10, n_heads), n_heads, 4)).astype(int)).tolist()
    return sorted({*small, *more, n_heads})
