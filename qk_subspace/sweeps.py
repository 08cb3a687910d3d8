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
from .ov import inject_circuit
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
    circuit: str = "qk",
) -> dict[str, Any]:
    """Inject ``target`` (``[n_layers, n_heads, d_head, d_head]``), measure perplexity, restore.

    ``circuit="qk"`` injects QK circuits through ``W_Q`` (:func:`inject_qk`), ``"ov"`` head-space
    OV circuits through ``W_V`` (:func:`qk_subspace.inject_ov`).

    Returns a row: ``ppl``, ``mean_nll``, ``ratio`` and its bootstrap CI (``ratio_low``,
    ``ratio_high``) against ``baseline`` on the same chunks, ``max_residual`` of the injection,
    plus whatever ``inside(model)`` returns (called while the edit is active).
    """
    edit = inject_circuit(model, target, circuit, heads=heads)  # type: ignore[arg-type]
    row, extra = _measure_edit(
        model, tokens, edit, baseline, batch_size, progress, n_boot, seed, desc, inside
    )
    max_residual = float(edit.residual.max())  # type: ignore[attr-defined]  # QKEdit / OVEdit
    return {**row, "max_residual": max_residual, **extra}


def _measure_edit(
    model: HookedTransformer,
    tokens: torch.Tensor,
    edit: Any,
    baseline: PerplexityResult,
    batch_size: int,
    progress: bool,
    n_boot: int,
    seed: int,
    desc: str,
    inside: Callable[[HookedTransformer], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Enter ``edit``, measure perplexity and call ``inside(model)`` while it is active, restore.

    Returns the perplexity row shared by both evaluators and what ``inside`` returned.
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
    }, extra


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
    order: str = "variance",
    importance: Any = None,
    circuit: str = "qk",
    diagnostics: bool = False,
    diag_tokens: torch.Tensor | None = None,
    diagnostics_options: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Perplexity vs the number of kept components K (the report's 6B).

    Args:
        model: the model ``pca`` was fitted on (``qs.qk_matrices(model)``).
        pca: fitted :class:`HeadPCA` over ``[n_layers, n_heads, d_head, d_head]``.
        tokens: ``[n_chunks, ctx]`` evaluation tokens.
        ks: K values in ``[0, n_heads]``; 0 = mean head, ``n_heads`` = all components.
        baseline: the unedited model's result on ``tokens`` (computed if not given).
        on_row: called with each finished row (e.g. to save progress).
        order: ``"variance"`` (default: K keeps the K largest-variance components) or
            ``"importance"`` (K keeps the K most important components of ``importance``).
        importance: for ``order="importance"``: a :func:`qk_subspace.component_importance`
            DataFrame (ranked by its default score) or an explicit ordering of component indices,
            most important first. Components it does not rank follow in variance order.
        circuit: ``"qk"`` (default, ``pca`` fitted on ``qs.qk_matrices``) or ``"ov"``
            (``qs.ov_matrices``, injected through ``W_V``).
        diagnostics: also compare every head's attention pattern with the original, per K
            (:func:`qk_subspace.diagnostics.attention_diagnostics`, run while the edit is active).
        diag_tokens: ``[n_seqs, pos]`` the small diagnostic batch (e.g. 8 x 128), separate from
            ``tokens``; required with ``diagnostics=True``.
        diagnostics_options: extra keyword arguments for ``attention_diagnostics``
            (``head_scores``, ``rep_tokens``, ``batch_size``).

    Returns:
        DataFrame, one row per K: ``K``, ``n_components`` (components actually kept),
        ``cumulative_variance``, ``ppl``, ``mean_nll``, ``ratio`` (to baseline), ``ratio_low``,
        ``ratio_high`` (bootstrap CI over chunks), ``max_residual``, ``is_all`` (K keeps every
        non-zero component). ``df.attrs`` holds ``baseline_ppl`` and, if any K is "all",
        ``k_all_ratio`` and ``k_all_ok`` (``|ratio - 1| <= K_ALL_TOLERANCE``); also (JSON-friendly)
        ``order``, ``circuit``, ``component_order`` (the full ordering used: component indices,
        K keeps its first K) and ``variance_order``.
        With ``diagnostics``, each row also has ``diag_mean_kl``, ``diag_max_kl``,
        ``diag_max_kl_head``, ``diag_mean_js``, ``diag_mean_top1_agreement``, and
        ``df.attrs["attention_diagnostics"]`` holds the per-head records of every K (JSON-ready,
        with a ``K`` field; ``pd.DataFrame(records)`` is the long frame). The row passed to
        ``on_row`` carries that K's records under ``"attention_diagnostics"``.
    """
    ks = [validate_k(k, pca.n_heads_) for k in ks]
    imp_circuit = getattr(importance, "attrs", {}).get("circuit", circuit)
    if imp_circuit != circuit:
        raise ValueError(
            f"importance was measured on the {imp_circuit!r} circuit, the sweep is on {circuit!r}"
        )
    component_order = _component_order(pca, order, importance)
    if not ks:
        raise ValueError(f"ks must contain at least one K in [0, {pca.n_heads_}], got {ks!r}")
    cfg = model.cfg
    expected = ((cfg.n_layers, cfg.n_heads), (cfg.d_head, cfg.d_head))
    if (tuple(pca.head_shape_), tuple(pca.matrix_shape_)) != expected:
        raise ValueError(
            f"pca was fitted on heads {pca.head_shape_} of shape {pca.matrix_shape_}; this model needs "
            f"{expected[0]} heads of shape {expected[1]} (fit it on qs.qk_matrices(model))"
        )
    inside: Callable[[HookedTransformer], dict[str, Any]] | None = None
    diag_records: list[dict[str, Any]] = []
    if diagnostics:
        from .diagnostics import attention_diagnostics, diagnostics_to_records, summarize_diagnostics

        if diag_tokens is None:
            raise ValueError(
                "diag_tokens: diagnostics=True needs a small diagnostic batch [n_seqs, pos] (e.g. 8 x 128), "
                "separate from the perplexity tokens; see qk_subspace.diagnostics.diagnostic_batch"
            )
        options = dict(diagnostics_options or {})

        def _diag_inside(m: HookedTransformer) -> dict[str, Any]:
            return {"_diag": attention_diagnostics(m, diag_tokens, **options)}

        inside = _diag_inside
    if baseline is None:
        baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
    rows = []
    for K in tqdm(ks, desc="K sweep", disable=not progress):
        n_comp = min(K, pca.n_components_)
        kept = component_order[:n_comp]
        row: dict[str, Any] = {
            "K": K,
            "n_components": n_comp,
            "cumulative_variance": float(np.sum(pca.explained_variance_ratio_[kept])) if n_comp else 0.0,
        }
        target = pca.reconstruct(K) if order == "variance" else pca.reconstruct(components=kept)
        row.update(
            evaluate_edit(
                model,
                tokens,
                target.to(model.W_U.device),
                baseline,
                batch_size=batch_size,
                progress=progress,
                n_boot=n_boot,
                seed=seed,
                desc=f"K={K}",
                circuit=circuit,
                inside=inside,
            )
        )
        row["is_all"] = set(range(pca.n_nonzero_components_)) <= set(kept)
        diag = row.pop("_diag", None)
        records: list[dict[str, Any]] = []
        if diag is not None:
            row.update(summarize_diagnostics(diag))
            diag.insert(0, "K", K)
            records = diagnostics_to_records(diag)
            diag_records.extend(records)
        rows.append(row)
        if on_row is not None:
            on_row({**row, "attention_diagnostics": records} if diag is not None else row)
    df = pd.DataFrame(rows)
    if diagnostics:
        df.attrs["attention_diagnostics"] = diag_records
    df.attrs["baseline_ppl"] = baseline.ppl
    df.attrs["order"] = order
    df.attrs["circuit"] = circuit
    df.attrs["component_order"] = component_order
    df.attrs["variance_order"] = list(range(pca.n_components_))
    all_rows = df[df["is_all"]]
    if len(all_rows):
        worst = float(np.max(np.abs(all_rows["ratio"].to_numpy() - 1.0)))
        df.attrs["k_all_ratio"] = float(all_rows["ratio"].iloc[-1])
        df.attrs["k_all_ok"] = worst <= K_ALL_TOLERANCE
    return df


def _component_order(pca: HeadPCA, order: str, importance: Any) -> list[int]:
    """The full ordering of ``pca``'s components that ``sweep_k`` keeps prefixes of."""
    if order == "variance":
        if importance is not None:
            raise ValueError("importance is only used with order='importance'")
        return list(range(pca.n_components_))
    if order != "importance":
        raise ValueError(f"order must be 'variance' or 'importance', got {order!r}")
    if importance is None:
        raise ValueError(
            "order='importance' needs importance=: a qs.component_importance(...) result or an ordering "
            "of component indices (most important first)"
        )
    from .importance import importance_order

    ranked = importance_order(importance)
    bad = [c for c in ranked if not 0 <= c < pca.n_components_]
    if bad or len(set(ranked)) != len(ranked):
        raise ValueError(
            f"importance: the ordering must hold distinct component indices in [0, {pca.n_components_ - 1}]; "
            f"got {ranked}"
        )
    return ranked + [c for c in range(pca.n_components_) if c not in set(ranked)]


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
    row, _ = _measure_edit(model, tokens, edit, baseline, batch_size, progress, n_boot, seed, desc)
    residual = getattr(edit, "residual", None)  # set on entry by QKEdit / CircuitEdit
    if isinstance(residual, torch.Tensor):
        row["max_residual"] = float(residual.max())
        row["mean_residual"] = float(residual.mean())
    return row
