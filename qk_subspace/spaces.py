"""One entry point for the PCA spaces and groupings: raw, canonical and circuit; global or per layer.

* ``space="raw"``: the report's method, PCA of ``W_QK = W_Q^T W_K`` (basis-dependent), injected with
  :func:`~qk_subspace.injection.inject_qk`.
* ``space="canonical"``: the same, with every head first put into its canonical basis
  (:func:`~qk_subspace.gauge.canonical_gauge`); the whole sweep, baseline included, runs inside
  that gauge (the model's outputs are unchanged by it).
* ``space="circuit"``: gauge-invariant PCA of ``C_h = W_Q W_K^T``
  (:class:`~qk_subspace.circuit_pca.CircuitPCA`), injected through ``W_Q`` by least squares; the
  injection residual is reported per K.

``groupby="layer"`` fits one PCA per layer with the same K in every layer. :func:`compare_layerwise_global`
compares it with the global PCA at equal parameter count (see :mod:`qk_subspace.grouped_pca`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .circuit_pca import CircuitPCA
from .circuits import qk_matrices
from .clustering import cluster_heads
from .evaluation import PerplexityResult, perplexity
from .gauge import canonical_gauge
from .grouped_pca import LayerwisePCA, matched_global_k, pca_parameter_count
from .subspace import HeadPCA, validate_k
from .sweeps import K_ALL_TOLERANCE, evaluate_edit, evaluate_parameter_edit

__all__ = [
    "SPACES",
    "compare_layerwise_global",
    "fit_space_pca",
    "space_context",
    "sweep_circuit_clusters",
    "sweep_space",
]

Space = Literal["raw", "canonical", "circuit"]
SPACES: tuple[str, ...] = ("raw", "canonical", "circuit")


def _check_space(space: Any, groupby: Any) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if groupby not in (None, "layer"):
        raise ValueError(f"groupby must be None or 'layer', got {groupby!r}")


def space_context(model: HookedTransformer, space: Space) -> contextlib.AbstractContextManager[Any]:
    """The gauge a space needs while fitting and evaluating: ``canonical_gauge`` or a no-op."""
    return canonical_gauge(model) if space == "canonical" else contextlib.nullcontext()


def fit_space_pca(model: HookedTransformer, space: Space = "raw", groupby: str | None = None) -> Any:
    """Fit the PCA of a space on the model's current weights (call inside :func:`space_context`).

    Returns a :class:`HeadPCA` (raw/canonical, global), :class:`LayerwisePCA` (raw/canonical, per
    layer) or :class:`CircuitPCA` (circuit).
    """
    _check_space(space, groupby)
    if space == "circuit":
        return CircuitPCA(groupby=groupby).fit(model)  # type: ignore[arg-type]
    W = qk_matrices(model)
    return (LayerwisePCA(groupby="layer") if groupby == "layer" else HeadPCA()).fit(W)


def _variance(pca: Any, K: int) -> tuple[int, float, float]:
    """(components kept, fraction of the fitted variance, fraction of variance about the global mean)."""
    if isinstance(pca, HeadPCA):
        n_comp = min(K, pca.n_components_)
        cum = float(pca.cumulative_variance_[n_comp - 1]) if n_comp else 0.0
        return n_comp, cum, cum
    n_comp = min(K, pca.n_components_)
    return n_comp, pca.variance_explained(n_comp), pca.global_variance_explained(n_comp)


def _max_k(pca: Any) -> int:
    return int(pca.n_heads_) if isinstance(pca, HeadPCA) else int(pca.n_components_)


def _is_all(pca: Any, K: int) -> bool:
    return pca.n_nonzero_components_ <= K


def _feature_dim(model: HookedTransformer, space: str) -> int:
    return model.cfg.d_model**2 if space == "circuit" else model.cfg.d_head**2


def sweep_space(
    model: HookedTransformer,
    tokens: torch.Tensor,
    ks: Sequence[int] | Iterable[int],
    *,
    space: Space = "raw",
    groupby: str | None = None,
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    pca: Any = None,
) -> pd.DataFrame:
    """Perplexity vs K in a given PCA space and grouping (``sweep_k`` generalised).

    Args:
        ks: K values; 0 = mean head (per layer with ``groupby="layer"``); at most ``n_heads`` (global)
            or heads per layer (per layer).
        baseline: the unedited model's result (computed, inside the space's gauge, if not given).
        pca: a fitted estimator to reuse (must match ``space``/``groupby`` and the model's gauge).

    Returns:
        DataFrame, one row per K: ``K``, ``space``, ``groupby``, ``n_components``,
        ``cumulative_variance`` (fitted variance kept; pooled within layers for ``groupby="layer"``),
        ``global_variance`` (variance about the global mean head kept, comparable across groupings),
        ``n_params`` (numbers stored, :func:`~qk_subspace.grouped_pca.pca_parameter_count`), ``ppl``,
        ``mean_nll``, ``ratio``, ``ratio_low``, ``ratio_high``, ``max_residual`` (raw/canonical: max
        ``|W_Q^T W_K - target|``; circuit: max relative injection residual), ``mean_residual``
        (circuit), ``is_all``. ``df.attrs``: ``baseline_ppl``, ``k_all_ratio``/``k_all_ok``.
    """
    _check_space(space, groupby)
    ks = list(ks)
    if not ks:
        raise ValueError("ks must contain at least one K")
    rows: list[dict[str, Any]] = []
    with space_context(model, space):
        if pca is None:
            pca = fit_space_pca(model, space, groupby)
        ks = [validate_k(k, _max_k(pca)) for k in ks]
        if baseline is None:
            baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
        n_groups = model.cfg.n_layers if groupby == "layer" else 1
        D = _feature_dim(model, space)
        n = model.cfg.n_layers * model.cfg.n_heads
        device = model.W_U.device
        for K in tqdm(ks, desc=f"K sweep ({space}{', per layer' if groupby else ''})", disable=not progress):
            n_comp, cum, glob = _variance(pca, K)
            row: dict[str, Any] = {
                "K": K,
                "space": space,
                "groupby": groupby or "none",
                "n_components": n_comp,
                "cumulative_variance": cum,
                "global_variance": glob,
                "n_params": pca_parameter_count(n_comp, D, n, n_groups),
            }
            common: dict[str, Any] = {
                "batch_size": batch_size,
                "progress": progress,
                "n_boot": n_boot,
                "seed": seed,
                "desc": f"K={K}",
            }
            if space == "circuit":
                row.update(evaluate_parameter_edit(model, tokens, pca.inject(model, K=K), baseline, **common))
            else:
                row.update(evaluate_edit(model, tokens, pca.reconstruct(K).to(device), baseline, **common))
            row["is_all"] = _is_all(pca, K)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    df = pd.DataFrame(rows)
    df.attrs["baseline_ppl"] = baseline.ppl
    all_rows = df[df["is_all"]]
    if len(all_rows):
        df.attrs["k_all_ratio"] = float(all_rows["ratio"].iloc[-1])
        df.attrs["k_all_ok"] = bool((all_rows["ratio"] - 1.0).abs().max() <= K_ALL_TOLERANCE)
    return df


def compare_layerwise_global(
    model: HookedTransformer,
    tokens: torch.Tensor,
    ks_layer: Sequence[int],
    *,
    space: Space = "raw",
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
) -> pd.DataFrame:
    """Per-layer PCA (K per layer) vs global PCA with the largest K of no more parameters.

    Parameter count (numbers a reconstruction stores, ``D`` per head matrix: ``d_head^2`` raw /
    canonical, ``d_model^2`` circuit, ``n`` heads, ``L`` layers): per-layer ``L (D + K D) + n K``;
    global ``D + K_g D + n K_g``; ``K_g = matched_global_k(K)`` is the largest with at most the
    per-layer count.

    Returns:
        One row per ``K`` and grouping (``groupby`` = ``"layer"`` / ``"none"``): the
        :func:`sweep_space` columns plus ``K_layer`` (the per-layer K of the comparison).
    """
    _check_space(space, "layer")
    cfg = model.cfg
    n, L = cfg.n_layers * cfg.n_heads, cfg.n_layers
    D = _feature_dim(model, space)
    ks_layer = [validate_k(k, cfg.n_heads) for k in ks_layer]
    ks_global = [matched_global_k(k, D, n, L, max_k=n) for k in ks_layer]
    with space_context(model, space):
        if baseline is None:
            baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
        kw: dict[str, Any] = {
            "baseline": baseline,
            "batch_size": batch_size,
            "progress": progress,
            "n_boot": n_boot,
        }
        inner = "raw" if space == "canonical" else space  # already inside the canonical gauge
        per_layer = sweep_space(model, tokens, ks_layer, space=inner, groupby="layer", **kw)  # type: ignore[arg-type]
        glob = sweep_space(model, tokens, ks_global, space=inner, groupby=None, **kw)  # type: ignore[arg-type]
    per_layer["K_layer"] = ks_layer
    glob["K_layer"] = ks_layer
    out = pd.concat([per_layer, glob], ignore_index=True)
    out["space"] = space
    out.attrs["baseline_ppl"] = baseline.ppl
    return out


def sweep_circuit_clusters(
    model: HookedTransformer,
    pca: CircuitPCA,
    tokens: torch.Tensor,
    ks: Sequence[int],
    *,
    n_dims: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    baseline: PerplexityResult | None = None,
    n_boot: int = 2000,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """The report's 6C in circuit space: every head's ``C_h`` replaced by its cluster representative's.

    Heads are clustered (:func:`~qk_subspace.clustering.cluster_heads`) on the circuit-space
    coefficients of a global :class:`CircuitPCA`; the targets ``C_h = C_rep(h)`` (mixing matrix with
    one 1 per row) are injected through ``W_Q`` by least squares (:meth:`CircuitPCA.inject`), so
    every head's ``W_Q`` is rewritten (representatives get their own circuit back, residual 0).

    Returns:
        DataFrame like :func:`~qk_subspace.clustering.sweep_clusters`: ``k``, ``replaced``, ``ppl``,
        ``mean_nll``, ``ratio``, ``ratio_low``, ``ratio_high``, ``max_residual``, ``mean_residual``
        (relative injection residuals), ``inertia``, ``representatives``, ``assignments``.
    """
    if not isinstance(pca, CircuitPCA) or pca.groupby is not None:
        raise TypeError("sweep_circuit_clusters needs a fitted global CircuitPCA (groupby=None)")
    if baseline is None:
        baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
    n = pca.n_heads_
    rows: list[dict[str, Any]] = []
    for k in tqdm(list(ks), desc="cluster sweep (circuit)", disable=not progress):
        cl = cluster_heads(pca, k, n_dims=n_dims, seed=seed)  # type: ignore[arg-type]
        A = torch.eye(n, dtype=torch.float64)[torch.as_tensor(cl.source_index())].numpy()
        row: dict[str, Any] = {"k": int(k), "replaced": cl.n_replaced}
        row.update(
            evaluate_parameter_edit(
                model,
                tokens,
                pca.inject(model, A=A),
                baseline,
                batch_size=batch_size,
                progress=progress,
                n_boot=n_boot,
                seed=seed,
                desc=f"k={k}",
            )
        )
        row["inertia"] = cl.inertia
        row["representatives"] = cl.representative_labels()
        row["assignments"] = cl.assignments.tolist()
        rows.append(row)
        if on_row is not None:
            on_row(row)
    df = pd.DataFrame(rows)
    df.attrs["baseline_ppl"] = baseline.ppl
    return df
