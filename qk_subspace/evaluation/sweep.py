"""The sweep engine: evaluate a list of plans, each inside its edit, against one baseline.

Every sweep of the package -- top-K, importance order, clusters, random subspaces, drop-one,
per-head ablations, gauge studies, attention diagnostics -- is a list of
:class:`~qk_subspace.decomposition.plans.Plan` run by :func:`run_sweep`. For each plan it enters the
representation's edit (:meth:`~qk_subspace.representations.base.Representation.edit`), measures
perplexity on the tokens (paired with the baseline: ratio and bootstrap CI over chunks), calls an
optional ``inside(model, plan)`` while the edit is active, restores the weights, and streams the row to
``on_row``. Plans whose mixing is the identity ("K = all") must reproduce the baseline: the
frame's ``attrs`` say whether they do (``k_all_ok``, within :data:`K_ALL_TOLERANCE`).

A row is ``{**plan.columns, ppl, mean_nll, ratio, ratio_low, ratio_high, <residual columns>,
**plan.tail, **inside(model, plan)}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..decomposition.plans import Plan
from ..execution.base import Executor, SerialExecutor
from ..execution.fingerprint import weights_fingerprint
from ..representations import Representation, get
from ..representations.heads import Heads
from .perplexity import PerplexityResult, paired_ratio, perplexity

__all__ = ["K_ALL_TOLERANCE", "SweepJob", "evaluate_edit", "run_sweep"]

#: K = all must reproduce the baseline perplexity within this relative tolerance.
K_ALL_TOLERANCE = 1e-5

#: ``inside(model, plan)``: called while a plan's edit is active; returns extra row columns.
Inside = Callable[[Any, Plan], dict[str, Any]]


def evaluate_edit(
    model: Any,
    tokens: torch.Tensor,
    edit: Any,
    baseline: PerplexityResult,
    *,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    desc: str = "eval",
    inside: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Enter ``edit`` (any :class:`~qk_subspace.edits.parameter_edit.ParameterEdit`), measure, restore.

    Returns ``ppl``, ``mean_nll``, ``ratio`` and its bootstrap CI (``ratio_low``, ``ratio_high``)
    against ``baseline`` on the same chunks, then whatever ``inside(model)`` returned while the
    edit was active.
    """
    with edit:
        res = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc=desc)
        extra = inside(model) if inside is not None else {}
    ci = paired_ratio(baseline, res, n_boot=n_boot, seed=seed)
    return {
        "ppl": res.ppl,
        "mean_nll": res.mean_nll,
        "ratio": res.ppl / baseline.ppl,
        "ratio_low": ci.low,
        "ratio_high": ci.high,
        **extra,
    }


@dataclass
class SweepJob:
    """What evaluating one plan of a sweep needs besides the model: sent once to every worker.

    Attributes:
        representation: the representation whose edit realises each plan (evaluated inside its
            :meth:`~qk_subspace.representations.base.Representation.context` by workers that load the model).
        heads: the heads the plans' mixings act on.
        tokens: ``[n_chunks, ctx]`` perplexity tokens, or ``None`` (only ``inside`` per plan).
        baseline: the unedited model on ``tokens``.
        batch_size, n_boot, seed, edit_options: as in :func:`run_sweep`.
        inside: ``inside(model, plan)``, called while each edit is active (must not hold a model).
        weights: :func:`~qk_subspace.execution.fingerprint.weights_fingerprint` of the model the sweep
            runs on, checked by workers that load their own copy (``None``: not checked).
    """

    representation: Representation
    heads: Heads
    tokens: torch.Tensor | None
    baseline: PerplexityResult | None
    batch_size: int = 8
    n_boot: int = 2000
    seed: int = 0
    edit_options: dict[str, Any] = field(default_factory=dict)
    inside: Inside | None = None
    weights: str | None = None

    def evaluate(self, model: Any, plan: Plan, progress: bool = False) -> dict[str, Any]:
        """The row of ``plan`` (see the module docstring), measured on ``model`` and restored after."""
        rep = self.representation
        edit = rep.edit(model, self.heads, plan.mixing, **self.edit_options)
        if self.tokens is None:
            with edit:
                extra = self.inside(model, plan) if self.inside is not None else {}
            measured: dict[str, Any] = {}
        else:
            assert self.baseline is not None
            measured = evaluate_edit(
                model, self.tokens, edit, self.baseline, batch_size=self.batch_size, progress=progress,
                n_boot=self.n_boot, seed=self.seed, desc=plan.label, inside=_bind(self.inside, plan),
            )  # fmt: skip
            extra = {k: measured.pop(k) for k in list(measured) if k not in _MEASURED}
        return {**plan.columns, **measured, **rep.residual_columns(edit), **plan.tail, **extra}


def run_sweep(
    model: Any,
    tokens: torch.Tensor | None,
    representation: str | Representation,
    heads: Heads,
    plans: Sequence[Plan],
    *,
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    inside: Inside | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    edit_options: dict[str, Any] | None = None,
    desc: str = "sweep",
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Evaluate every plan inside its edit (see the module docstring).

    Args:
        model: the model the heads were read from (in the same weight state, e.g. inside the
            representation's :meth:`~qk_subspace.representations.base.Representation.context`).
        tokens: ``[n_chunks, ctx]`` perplexity tokens, or ``None`` to run only ``inside`` per plan.
        representation: a registered name or a :class:`~qk_subspace.representations.base.Representation`.
        heads: the :class:`~qk_subspace.representations.heads.Heads` the plans' mixings act on.
        plans: the points.
        baseline: the unedited model on ``tokens`` (computed if not given).
        inside: called as ``inside(model, plan)`` while each edit is active; its dict is added to the row.
        on_row: called with every finished row, in the order rows finish.
        edit_options: keyword options of the representation's edit (e.g. ``method="pinv"`` for ``"qk"``).
        executor: where the plans are evaluated (:mod:`qk_subspace.execution`): default
            :class:`~qk_subspace.execution.base.SerialExecutor` (one after the other, on ``model``); a
            :class:`~qk_subspace.execution.ray_executor.RayExecutor` evaluates them on workers that each
            load the model once. The rows are the same either way.

    Returns:
        One row per plan, in the order of ``plans``; ``attrs``: ``baseline_ppl`` and, if a plan is the
        identity, ``k_all_ratio`` (its ratio) and ``k_all_ok``.
    """
    rep = get(representation)
    if tokens is not None and baseline is None:
        baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
    plans = list(plans)
    executor = executor if executor is not None else SerialExecutor()
    job = SweepJob(
        rep, heads, tokens, baseline, batch_size, n_boot, seed, dict(edit_options or {}), inside,
        weights=weights_fingerprint(model) if executor.remote else None,
    )  # fmt: skip
    rows: list[dict[str, Any] | None] = [None] * len(plans)
    bar = tqdm(total=len(plans), desc=desc, disable=not progress)
    try:
        for index, row in executor.map(model, job, plans, progress=progress):
            rows[index] = row
            bar.update()
            if on_row is not None:
                on_row(row)
    finally:
        bar.close()
    done = [row for row in rows if row is not None]  # every row: the executor yields each plan once
    df = pd.DataFrame(done)
    identity = [
        float(r["ratio"])
        for r, p in zip(done, plans, strict=True)
        if tokens is not None and p.mixing.is_identity
    ]
    if baseline is not None:
        df.attrs["baseline_ppl"] = baseline.ppl
    if identity:
        df.attrs["k_all_ratio"] = identity[-1]
        df.attrs["k_all_ok"] = bool(np.max(np.abs(np.asarray(identity) - 1.0)) <= K_ALL_TOLERANCE)
    return df


_MEASURED = ("ppl", "mean_nll", "ratio", "ratio_low", "ratio_high")


def _bind(inside: Inside | None, plan: Plan) -> Callable[[Any], dict[str, Any]] | None:
    """``inside`` with its plan bound (what :func:`evaluate_edit` calls with the model)."""
    if inside is None:
        return None
    return lambda model: inside(model, plan)
