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
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..decomposition.plans import Plan
from ..representations import Representation, get
from ..representations.heads import Heads
from .perplexity import PerplexityResult, paired_ratio, perplexity

__all__ = ["K_ALL_TOLERANCE", "evaluate_edit", "run_sweep"]

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
        on_row: called with every finished row.
        edit_options: keyword options of the representation's edit (e.g. ``method="pinv"`` for ``"qk"``).

    Returns:
        One row per plan; ``attrs``: ``baseline_ppl`` and, if a plan is the identity,
        ``k_all_ratio`` (its ratio) and ``k_all_ok``.
    """
    rep = get(representation)
    if tokens is not None and baseline is None:
        baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
    options = dict(edit_options or {})
    rows: list[dict[str, Any]] = []
    identity: list[float] = []
    for plan in tqdm(list(plans), desc=desc, disable=not progress):
        edit = rep.edit(model, heads, plan.mixing, **options)
        if tokens is None:
            with edit:
                extra = inside(model, plan) if inside is not None else {}
            measured: dict[str, Any] = {}
        else:
            assert baseline is not None
            measured = evaluate_edit(
                model, tokens, edit, baseline, batch_size=batch_size, progress=progress,
                n_boot=n_boot, seed=seed, desc=plan.label, inside=_bind(inside, plan),
            )  # fmt: skip
            extra = {k: measured.pop(k) for k in list(measured) if k not in _MEASURED}
        row = {**plan.columns, **measured, **rep.residual_columns(edit), **plan.tail, **extra}
        if tokens is not None and plan.mixing.is_identity:
            identity.append(float(row["ratio"]))
        rows.append(row)
        if on_row is not None:
            on_row(row)
    df = pd.DataFrame(rows)
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
