"""The sweeps of the report, each a plan generator plus the engine (:func:`~qk_subspace.evaluation.sweep.run_sweep`).

* :func:`sweep`: perplexity vs K for any representation and grouping (fits the PCA);
* :func:`sweep_k`: the same for a fitted PCA, the report's 6B (variance or importance order,
  optional attention diagnostics per K);
* :func:`sweep_clusters`: every head replaced by its cluster representative (6C);
* :func:`random_subspace_sweep`: random K-dimensional subspaces instead of the top-K (a null baseline);
* :func:`compare_layerwise_global`: per-layer PCA vs global PCA at equal parameter count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from ..decomposition.pca import HeadPCA, validate_k
from ..decomposition.plans import Plan, cluster_plans, random_plans, topk_plans
from ..decomposition.storage import matched_global_k
from ..execution.base import Executor
from ..representations import Representation, get
from .perplexity import PerplexityResult, perplexity
from .sweep import run_sweep

__all__ = [
    "REPORT_K_GRID",
    "component_order",
    "compare_layerwise_global",
    "random_subspace_sweep",
    "sweep",
    "sweep_clusters",
    "sweep_k",
]

#: The seed report's K grid (GPT-2 small; 144 = all components).
REPORT_K_GRID = (1, 3, 10, 32, 64, 80, 100, 110, 120, 130, 140, 144)

Row = Callable[[dict[str, Any]], None]


def _representation(pca: HeadPCA, representation: str | Representation | None) -> Representation:
    """The representation of a fitted PCA: its heads' own, else ``representation`` (default ``"qk"``)."""
    own = getattr(pca, "heads_", None)
    own_name = getattr(own, "representation", None)
    if representation is not None and own_name is not None and get(representation).name != own_name:
        raise ValueError(f"the PCA was fitted on {own_name!r} heads, not {get(representation).name!r}")
    return get(representation or own_name or "qk")


def _check_pca_model(model: Any, pca: HeadPCA, rep: Representation) -> None:
    cfg = model.cfg
    if tuple(pca.head_shape_) != (cfg.n_layers, cfg.n_heads) or (
        pca.matrix_shape_ is not None and tuple(pca.matrix_shape_) != (cfg.d_head, cfg.d_head)
    ):
        raise ValueError(
            f"pca was fitted on heads {pca.head_shape_} of shape {pca.matrix_shape_}; this model needs "
            f"{(cfg.n_layers, cfg.n_heads)} heads of shape {(cfg.d_head, cfg.d_head)} "
            f"(fit it on qs.representations.get({rep.name!r}).heads(model))"
        )


def component_order(pca: HeadPCA, importance: Any) -> list[int]:
    """The full ordering of ``pca``'s components whose prefixes an importance-ordered sweep keeps.

    ``importance``: a :func:`~qk_subspace.evaluation.importance.component_importance` frame (ranked by its
    score) or an explicit ordering, most important first; components it does not rank follow in
    variance order.
    """
    from .importance import importance_order

    if importance is None:
        raise ValueError(
            "order='importance' needs importance=: a qs.component_importance(...) result or an ordering "
            "of component indices (most important first)"
        )
    ranked = importance_order(importance)
    bad = [c for c in ranked if not 0 <= c < pca.n_components_]
    if bad or len(set(ranked)) != len(ranked):
        raise ValueError(
            f"importance: the ordering must hold distinct component indices in [0, {pca.n_components_ - 1}]; "
            f"got {ranked}"
        )
    return ranked + [c for c in range(pca.n_components_) if c not in set(ranked)]


def sweep_k(
    model: Any,
    pca: HeadPCA,
    tokens: torch.Tensor,
    ks: Sequence[int] | Iterable[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
    baseline: PerplexityResult | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    on_row: Row | None = None,
    order: Literal["variance", "importance"] = "variance",
    importance: Any = None,
    representation: str | Representation | None = None,
    diagnostics: bool = False,
    diag_tokens: torch.Tensor | None = None,
    diagnostics_options: dict[str, Any] | None = None,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Perplexity vs the number of kept components K (the report's 6B).

    Args:
        model: the model ``pca`` was fitted on.
        pca: a fitted :class:`~qk_subspace.decomposition.pca.HeadPCA` (on a representation's heads, or on
            plain matrices: then ``representation`` says which, default ``"qk"``).
        tokens: ``[n_chunks, ctx]`` evaluation tokens.
        ks: K values in ``[0, n_heads]``; 0 = mean head, ``n_heads`` = all components.
        baseline: the unedited model's result on ``tokens`` (computed if not given).
        on_row: called with each finished row (e.g. to save progress).
        order: ``"variance"`` (K keeps the K largest-variance components) or ``"importance"`` (the K
            most important components of ``importance``, see :func:`component_order`).
        diagnostics: also compare every head's attention pattern with the original, per K
            (:func:`~qk_subspace.evaluation.diagnostics.attention_diagnostics`, while the edit is active)
            on ``diag_tokens`` ``[n_seqs, pos]`` (a small batch separate from ``tokens``), with
            ``diagnostics_options`` (``head_scores``, ``rep_tokens``, ``batch_size``).
        executor: where the points are evaluated (:func:`~qk_subspace.evaluation.sweep.run_sweep`).

    Returns:
        One row per K: ``K``, ``n_components`` (components actually kept), ``cumulative_variance``,
        ``ppl``, ``mean_nll``, ``ratio``, ``ratio_low``, ``ratio_high`` (bootstrap CI over chunks),
        ``max_residual``, ``is_all`` (A = I). ``attrs``: ``baseline_ppl``, ``k_all_ratio``/``k_all_ok``,
        ``order``, ``circuit``, ``component_order`` (K keeps its first K), ``variance_order``.
        With ``diagnostics`` each row also has ``diag_mean_kl``, ``diag_max_kl``, ``diag_max_kl_head``,
        ``diag_mean_js``, ``diag_mean_top1_agreement``, ``attrs["attention_diagnostics"]`` holds the
        per-head records of every K (with a ``K`` field), and the row passed to ``on_row`` carries that
        K's records under ``"attention_diagnostics"``.
    """
    rep = _representation(pca, representation)
    imp_circuit = getattr(importance, "attrs", {}).get("circuit", rep.circuit)
    if imp_circuit != rep.circuit:
        raise ValueError(
            f"importance was measured on the {imp_circuit!r} circuit, the sweep is on {rep.circuit!r}"
        )
    ks = [validate_k(k, pca.n_heads_) for k in ks]
    if order == "variance":
        if importance is not None:
            raise ValueError("importance is only used with order='importance'")
        ordering = list(range(pca.n_components_))
    elif order == "importance":
        ordering = component_order(pca, importance)
    else:
        raise ValueError(f"order must be 'variance' or 'importance', got {order!r}")
    if not ks:
        raise ValueError(f"ks must contain at least one K in [0, {pca.n_heads_}], got {ks!r}")
    _check_pca_model(model, pca, rep)
    plans = topk_plans(pca, ks, order=None if order == "variance" else ordering)
    inside: Callable[[Any, Plan], dict[str, Any]] | None = None
    records: list[dict[str, Any]] = []
    forward = on_row
    if diagnostics:
        inside, records, forward = _diagnostics_hooks(diag_tokens, diagnostics_options, on_row)
    df = run_sweep(
        model, tokens, rep, pca.heads_, plans, baseline=baseline, batch_size=batch_size, progress=progress,
        n_boot=n_boot, seed=seed, inside=inside, on_row=forward, desc="K sweep", executor=executor,
    )  # fmt: skip
    if diagnostics:
        df.attrs["attention_diagnostics"] = sorted(records, key=lambda r: r["K"])  # stable: heads in order
    df.attrs.update(
        order=order,
        circuit=rep.circuit,
        component_order=ordering,
        variance_order=list(range(pca.n_components_)),
    )
    return df


def _diagnostics_hooks(
    diag_tokens: torch.Tensor | None, options: dict[str, Any] | None, on_row: Row | None
) -> tuple[Callable[[Any, Plan], dict[str, Any]], list[dict[str, Any]], Row]:
    """``inside`` (per-head attention diagnostics of a plan), the records list it fills, and an ``on_row``
    that hands each row to ``on_row`` with its K's records under ``"attention_diagnostics"``."""
    from .diagnostics import attention_diagnostics, diagnostics_to_records, summarize_diagnostics

    if diag_tokens is None:
        raise ValueError(
            "diag_tokens: diagnostics=True needs a small diagnostic batch [n_seqs, pos] (e.g. 8 x 128), "
            "separate from the perplexity tokens; see qk_subspace.evaluation.diagnostics.diagnostic_batch"
        )
    opts = dict(options or {})
    records: list[dict[str, Any]] = []

    def inside(model: Any, plan: Plan) -> dict[str, Any]:  # runs where the plan is evaluated
        diag = attention_diagnostics(model, diag_tokens, **opts)
        summary = summarize_diagnostics(diag)
        diag.insert(0, "K", plan.columns["K"])
        return {**summary, "attention_diagnostics": diagnostics_to_records(diag)}

    def forward(row: dict[str, Any]) -> None:  # runs here, as rows arrive: the records leave the row
        own = row.pop("attention_diagnostics")
        records.extend(own)
        if on_row is not None:
            on_row({**row, "attention_diagnostics": own})

    return inside, records, forward


def sweep(
    model: Any,
    tokens: torch.Tensor,
    ks: Sequence[int] | Iterable[int],
    *,
    representation: str | Representation = "qk",
    groupby: Literal["layer"] | None = None,
    pca: HeadPCA | None = None,
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    on_row: Row | None = None,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Perplexity vs K in any representation and grouping (inside the representation's weight context).

    Args:
        ks: K values; 0 = mean head (per layer with ``groupby="layer"``); at most the heads per group.
        representation: ``"qk"`` (raw ``W_Q^T W_K``), ``"qk-canonical"``, ``"qk-circuit"``, ``"ov"``, ...
        pca: a fitted :class:`~qk_subspace.decomposition.pca.HeadPCA` to reuse (fitted in the same context).
        baseline: the unedited model's result (computed inside the context if not given).

    Returns:
        One row per K: ``K``, ``space``, ``groupby``, ``n_components``, ``cumulative_variance`` (fitted
        variance kept; pooled within layers), ``global_variance`` (variance about the global mean head
        kept, comparable across groupings), ``n_params`` (numbers stored), ``ppl``, ``mean_nll``,
        ``ratio``, ``ratio_low``, ``ratio_high``, ``max_residual`` (head-space: max
        ``|realised - target|``; circuit: max relative residual), ``mean_residual`` (circuit), ``is_all``.
        ``attrs``: ``baseline_ppl``, ``k_all_ratio``/``k_all_ok``.
    """
    rep = get(representation)
    ks = list(ks)
    if not ks:
        raise ValueError("ks must contain at least one K")
    with rep.context(model):
        if pca is None:
            pca = HeadPCA(groupby=groupby).fit(rep.heads(model))
        plans = topk_plans(pca, ks, columns="space", space=rep.space)
        if baseline is None:
            baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
        desc = f"K sweep ({rep.space}{', per layer' if pca.groupby else ''})"
        return run_sweep(
            model, tokens, rep, pca.heads_, plans, baseline=baseline, batch_size=batch_size, progress=progress,
            n_boot=n_boot, seed=seed, on_row=on_row, desc=desc, executor=executor,
        )  # fmt: skip


def sweep_clusters(
    model: Any,
    pca: HeadPCA,
    tokens: torch.Tensor,
    ks: Sequence[int] | Iterable[int] = (4, 8, 12, 16, 32, 64),
    *,
    n_dims: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    baseline: PerplexityResult | None = None,
    n_boot: int = 2000,
    on_row: Row | None = None,
    representation: str | Representation | None = None,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Perplexity with every head replaced by its cluster representative, for each k (the report's 6C).

    Values of ``k >= n_heads`` are dropped (nothing would be replaced); other values must be
    integers >= 1. Heads are clustered on ``pca``'s coefficients
    (:func:`~qk_subspace.decomposition.clustering.cluster_heads`); the replaced heads get their
    representative's circuit through the representation's edit.

    Returns:
        One row per k: ``k``, ``replaced`` (= n_heads - k), ``ppl``, ``mean_nll``, ``ratio``,
        ``ratio_low``, ``ratio_high``, ``max_residual`` (and ``mean_residual`` in circuit space),
        ``inertia``, ``representatives`` (labels), ``assignments`` (nested list ``[n_layers][n_heads]``).
    """
    rep = _representation(pca, representation)
    plans = cluster_plans(pca, ks, n_dims=n_dims, seed=seed)
    return run_sweep(
        model, tokens, rep, pca.heads_, plans, baseline=baseline, batch_size=batch_size, progress=progress,
        n_boot=n_boot, seed=seed, on_row=on_row, desc="cluster sweep", executor=executor,
    )  # fmt: skip


def random_subspace_sweep(
    model: Any,
    tokens: torch.Tensor,
    ks: Sequence[int],
    *,
    representation: str | Representation = "qk",
    groupby: Literal["layer"] | None = None,
    n_seeds: int = 3,
    seed: int = 0,
    within: Literal["span", "ambient"] = "span",
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Perplexity when every head is rebuilt from a *random* K-dim subspace (a null baseline of the top-K).

    The PCA of the representation is fitted inside its context with the Gram engine; ``n_seeds`` random
    subspaces per K are drawn from ``numpy.random.default_rng(seed)`` (:func:`~qk_subspace.decomposition.plans.random_plans`).

    Returns:
        One row per (K, seed): ``K``, ``seed``, ``space``, ``groupby``, ``within``, ``variance``
        (fraction of the fitted variance kept), ``ppl``, ``mean_nll``, ``ratio``, ``ratio_low``,
        ``ratio_high``, ``max_residual``. Summarise with :func:`~qk_subspace.decomposition.nulls.summarize_random`.
    """
    rep = get(representation)
    if within == "ambient" and not rep.supported("ambient"):
        raise ValueError(
            f"within='ambient' is only available for head-space representations, not {rep.name!r} "
            "(d_model^2 is too large)"
        )
    rng = np.random.default_rng(seed)
    with rep.context(model):
        if baseline is None:
            baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
        pca = HeadPCA(groupby=groupby, engine="gram").fit(rep.heads(model))
        plans = random_plans(pca, ks, n_seeds=n_seeds, rng=rng, within=within, space=rep.space)
        return run_sweep(
            model, tokens, rep, pca.heads_, plans, baseline=baseline, batch_size=batch_size, progress=progress,
            n_boot=n_boot, desc=f"random subspaces ({rep.space})", executor=executor,
        )  # fmt: skip


def compare_layerwise_global(
    model: Any,
    tokens: torch.Tensor,
    ks_layer: Sequence[int],
    *,
    representation: str | Representation = "qk",
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Per-layer PCA (K per layer) vs global PCA with the largest K of no more parameters.

    Parameter count (numbers a reconstruction stores, ``D`` per head, ``n`` heads, ``L`` layers):
    per-layer ``L (D + K D) + n K``; global ``D + K_g D + n K_g``; ``K_g`` =
    :func:`~qk_subspace.decomposition.storage.matched_global_k`.

    Returns:
        One row per ``K`` and grouping (``groupby`` = ``"layer"`` / ``"none"``): the :func:`sweep`
        columns plus ``K_layer`` (the per-layer K of the comparison).
    """
    rep = get(representation)
    cfg = model.cfg
    n, L = cfg.n_layers * cfg.n_heads, cfg.n_layers
    ks_layer = [validate_k(k, cfg.n_heads) for k in ks_layer]
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "progress": progress,
        "n_boot": n_boot,
        "executor": executor,
    }
    with rep.context(model):
        heads = rep.heads(model)
        D = heads.feature_dim
        ks_global = [matched_global_k(k, D, n, L, max_k=n) for k in ks_layer]
        if baseline is None:
            baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
        frames = []
        for groupby, grid in (("layer", ks_layer), (None, ks_global)):
            pca = HeadPCA(groupby=groupby).fit(heads)  # type: ignore[arg-type]
            plans = topk_plans(pca, grid, columns="space", space=rep.space)
            frames.append(
                run_sweep(model, tokens, rep, heads, plans, baseline=baseline, desc="layerwise", **kw)
            )
    for frame in frames:
        frame["K_layer"] = ks_layer
    out = pd.concat(frames, ignore_index=True)
    out.attrs["baseline_ppl"] = baseline.ppl
    return out
