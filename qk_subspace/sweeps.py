"""Sweeps: perplexity of the model with injected QK circuits, over a grid of settings."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .evaluation import PerplexityResult, paired_ratio, perplexity
from .injection import inject_qk
from .subspace import HeadPCA, validate_k

__all__ = ["sweep_k", "evaluate_edit", "REPORT_K_GRID", "K_ALL_TOLERANCE", "evaluate_parameter_edit"]

#: The seed report's K grid (GPT-2 small; 144 = all components).
REPORT_K_GRID = (1, 3, 10, 32, 64, 80, 100, 110, 120, 130, 140, 144)
#: K = all must reproduce the baseline perplexity within this relative tolerance.
K_ALL_TOLERANCE = 1e-5


def evaluate_edit(
    model: HookedTransformer,
    tokens: torch.Tensor,
    target: torch.Tensor,
    baseline: PerplexityResult,
    *,
    heads: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    desc: str = "eval",
    inside: Callable[[HookedTransformer], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Inject ``target`` (``[n_layers, n_heads, d_head, d_head]``), measure perplexity, restore.

    Returns a row: ``ppl``, ``mean_nll``, ``ratio`` and its bootstrap CI (``ratio_low``,
    ``ratio_high``) against ``baseline`` on the same chunks, ``max_residual`` of the injection,
    plus whatever ``inside(model)`` returns (called while the edit is active).
    """
    with inject_qk(model, target, heads=heads) as edit:
        res = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc=desc)
        extra = inside(model) if inside is not None else {}
    ci = paired_ratio(baseline, res, n_boot=n_boot, seed=seed)
    return {
        "ppl": res.ppl,
        "mean_nll": res.mean_nll,
        "ratio": res.ppl / baseline.ppl,
        "ratio_low": ci.low,
        "ratio_high": ci.high,
        "max_residual": float(edit.residual.max()),
        **extra,
    }


def sweep_k(
    model: HookedTransformer,
    pca: HeadPCA,
    tokens: torch.Tensor,
    ks: Sequence[int] | Iterable[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
    baseline: PerplexityResult | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Perplexity vs the number of kept components K (the report's 6B).

    Args:
        model: the model ``pca`` was fitted on (``qs.qk_matrices(model)``).
        pca: fitted :class:`HeadPCA` over ``[n_layers, n_heads, d_head, d_head]``.
        tokens: ``[n_chunks, ctx]`` evaluation tokens.
        ks: K values in ``[0, n_heads]``; 0 = mean head, ``n_heads`` = all components.
        baseline: the unedited model's result on ``tokens`` (computed if not given).
        on_row: called with each finished row (e.g. to save progress).

    Returns:
        DataFrame, one row per K: ``K``, ``n_components`` (components actually kept),
        ``cumulative_variance``, ``ppl``, ``mean_nll``, ``ratio`` (to baseline), ``ratio_low``,
        ``ratio_high`` (bootstrap CI over chunks), ``max_residual``, ``is_all`` (K keeps every
        non-zero component). ``df.attrs`` holds ``baseline_ppl`` and, if any K is "all",
        ``k_all_ratio`` and ``k_all_ok`` (``|ratio - 1| <= K_ALL_TOLERANCE``).
    """
    ks = [validate_k(k, pca.n_heads_) for k in ks]
    if not ks:
        raise ValueError("ks must contain at least one K")
    if baseline is None:
        baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
    rows = []
    for K in tqdm(ks, desc="K sweep", disable=not progress):
        n_comp = min(K, pca.n_components_)
        row: dict[str, Any] = {
            "K": K,
            "n_components": n_comp,
            "cumulative_variance": float(pca.cumulative_variance_[n_comp - 1]) if n_comp else 0.0,
        }
        row.update(
            evaluate_edit(
                model, tokens, pca.reconstruct(K).to(model.W_U.device), baseline,
                batch_size=batch_size, progress=progress, n_boot=n_boot, seed=seed, desc=f"K={K}",
            )
        )
        row["is_all"] = n_comp >= pca.n_nonzero_components_
        rows.append(row)
        if on_row is not None:
            on_row(row)
    df = pd.DataFrame(rows)
    df.attrs["baseline_ppl"] = baseline.ppl
    all_rows = df[df["is_all"]]
    if len(all_rows):
        worst = float(np.max(np.abs(all_rows["ratio"].to_numpy() - 1.0)))
        df.attrs["k_all_ratio"] = float(all_rows["ratio"].iloc[-1])
        df.attrs["k_all_ok"] = worst <= K_ALL_TOLERANCE
    return df


def evaluate_parameter_edit(
    model: HookedTransformer,
    tokens: torch.Tensor,
    edit: Any,
    baseline: PerplexityResult,
    *,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    desc: str = "eval",
) -> dict[str, Any]:
    """Like :func:`evaluate_edit` for any prepared edit (a :class:`~qk_subspace.injection.ParameterEdit`).

    Enters ``edit``, measures perplexity, restores. The row has ``ppl``, ``mean_nll``, ``ratio``,
    ``ratio_low``, ``ratio_high`` and, if the edit reports one (``edit.residual``, ``[n_layers,
    n_heads]``), ``max_residual`` and ``mean_residual``.
    """
    with edit:
        res = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc=desc)
    ci = paired_ratio(baseline, res, n_boot=n_boot, seed=seed)
    row: dict[str, Any] = {
        "ppl": res.ppl,
        "mean_nll": res.mean_nll,
        "ratio": res.ppl / baseline.ppl,
        "ratio_low": ci.low,
        "ratio_high": ci.high,
    }
    residual = getattr(edit, "residual", None)  # set on entry by QKEdit / CircuitEdit
    if isinstance(residual, torch.Tensor):
        row["max_residual"] = float(residual.max())
        row["mean_residual"] = float(residual.mean())
    return row
