"""Null baselines of the variance curve: does the real PCA spectrum differ from chance?

* **K = 0** (every head replaced by the mean head): the row ``K=0`` of every sweep.
* **Random K-dimensional subspace** (:func:`random_subspace_variance`; evaluated with
  :func:`qk_subspace.evaluation.sweeps.random_subspace_sweep`):
  instead of the top-K principal directions, a Haar-random orthonormal basis of the same size, several
  seeds, mean and spread. ``within="span"`` (default) draws it inside the span of the centred heads
  (``r`` = non-zero components, expected variance kept ``K / r``): it isolates whether the *ordering*
  of PCA matters. ``within="ambient"`` (raw space only) draws it in the full ``d_head^2``-dimensional
  matrix space (expected ``K / d_head^2``).
* **Spectrum nulls** for the variance curve (:func:`spectrum_nulls`): the same heads with their
  entries shuffled within each head (keeps each head's norm and entry distribution, destroys shared
  structure), Gaussian heads with matched Frobenius norms, and the Marchenko-Pastur prediction for
  i.i.d. equal-variance heads (:func:`marchenko_pastur_curve`). In circuit space the shuffles and
  Gaussians act on the factors ``W_Q``, ``W_K`` (MP does not apply: circuits of random factors are
  not i.i.d. entries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from ..representations import CircuitHeads, DenseHeads, Representation, get
from .pca import HeadPCA
from .plans import random_ambient

__all__ = [
    "marchenko_pastur_curve",
    "marchenko_pastur_quantiles",
    "random_subspace_variance",
    "spectrum_nulls",
    "summarize_random",
]


# ------------------------------------------------------------------------ Marchenko-Pastur
def marchenko_pastur_quantiles(p: int, N: int, grid: int = 20001) -> np.ndarray:
    """Expected sorted (descending) non-zero eigenvalues of ``X X^T / N`` for ``X`` ``[p, N]`` i.i.d.
    unit-variance, ``p <= N``, from the Marchenko-Pastur law with ratio ``gamma = p / N``
    (density ``sqrt((b - x)(x - a)) / (2 pi gamma x)`` on ``[a, b] = [(1 -/+ sqrt(gamma))^2]``),
    taken at the quantiles ``(i - 1/2) / p``."""
    if p < 1 or p > N:
        raise ValueError(f"need 1 <= p <= N, got p={p}, N={N}")
    g = p / N
    a, b = (1 - np.sqrt(g)) ** 2, (1 + np.sqrt(g)) ** 2
    x = np.linspace(a, b, grid)
    dens = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * np.pi * g * np.where(x > 0, x, np.inf))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(x))])
    cdf /= cdf[-1]
    q = (np.arange(1, p + 1) - 0.5) / p
    return np.sort(np.interp(q, cdf, x))[::-1]


def marchenko_pastur_curve(n_heads: int, n_features: int) -> np.ndarray:
    """MP-predicted cumulative explained-variance ratio ``[r]`` for ``n_heads`` centred i.i.d. heads
    of ``n_features`` entries (``r = min(n_heads - 1, n_features)`` non-zero components)."""
    p, N = sorted((n_heads - 1, n_features))
    lam = marchenko_pastur_quantiles(p, N)
    return np.cumsum(lam) / lam.sum()


# ------------------------------------------------------------------------ spectrum nulls
def _curve(pca: HeadPCA) -> np.ndarray:
    return np.asarray(pca.cumulative_variance_, dtype=np.float64)


def _shuffled_or_gaussian(F: torch.Tensor, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """Every head's entries (``F`` ``[n, ...]``) shuffled, or replaced by a Gaussian of the same norm."""
    F = F.clone()
    for h in range(F.shape[0]):
        flat = F[h].flatten()
        if kind == "shuffled":
            new = flat[torch.from_numpy(rng.permutation(flat.numel()))]
        else:
            g = torch.from_numpy(rng.standard_normal(flat.numel()))
            new = g * flat.norm() / g.norm()
        F[h] = new.reshape(F[h].shape)
    return F


def spectrum_nulls(
    model: Any,
    representation: str | Representation = "qk",
    n_seeds: int = 5,
    seed: int = 0,
    groupby: str | None = None,
) -> pd.DataFrame:
    """Cumulative explained-variance curves of the real heads and of the null models.

    The PCA is the Gram engine's (:class:`~qk_subspace.decomposition.pca.HeadPCA` ``engine="gram"``),
    fitted inside the representation's context. Head-space representations shuffle (or redraw) each
    head's matrix; ``"qk-circuit"`` does it to the factors ``W_Q``, ``W_K``.

    Returns a long DataFrame: ``curve`` in ``real``, ``shuffled``, ``gaussian`` (mean over seeds
    with ``std``), ``random_subspace`` (expected ``K / r``) and, head-space global only,
    ``marchenko_pastur``; ``K`` (1-based), ``cumulative_variance``, ``std``.
    """
    rep = get(representation)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []

    def add(curve: str, values: np.ndarray, std: np.ndarray | None = None) -> None:
        for k, v in enumerate(values, start=1):
            rows.append(
                {
                    "curve": curve,
                    "K": k,
                    "cumulative_variance": float(v),
                    "std": float(std[k - 1]) if std is not None else 0.0,
                }
            )

    def fit(heads: Any) -> HeadPCA:
        return HeadPCA(groupby=groupby, engine="gram").fit(heads)  # type: ignore[arg-type]

    with rep.context(model):
        heads = rep.heads(model)
    real = fit(heads)
    if isinstance(heads, CircuitHeads):
        W_Q, W_K = heads.W_Q, heads.W_K

        def fit_null(kind: str) -> np.ndarray:
            Q = _shuffled_or_gaussian(W_Q.reshape(-1, *W_Q.shape[-2:]), kind, rng)
            K = _shuffled_or_gaussian(W_K.reshape(-1, *W_K.shape[-2:]), kind, rng)
            return _curve(fit(CircuitHeads(Q.reshape(W_Q.shape), K.reshape(W_K.shape), layout=heads.layout)))

    else:
        assert isinstance(heads, DenseHeads) and heads.features is not None
        X = torch.from_numpy(heads.features)
        shape = (*heads.head_shape, *heads.matrix_shape)

        def fit_null(kind: str) -> np.ndarray:
            return _curve(fit(DenseHeads(_shuffled_or_gaussian(X, kind, rng).reshape(shape))))

    add("real", _curve(real))
    for kind in ("shuffled", "gaussian"):
        curves = np.stack([fit_null(kind) for _ in range(n_seeds)])
        add(kind, curves.mean(axis=0), curves.std(axis=0, ddof=1) if n_seeds > 1 else None)
    r = np.maximum(real._rank, 1)
    m = real.n_components_
    expected = np.array([np.sum(np.minimum(k, r) / r * real.eigvals_.sum(axis=1)) for k in range(1, m + 1)])
    add("random_subspace", expected / max(real.within_ss_, np.finfo(float).tiny))
    if heads.features is not None and groupby is None:
        add("marchenko_pastur", marchenko_pastur_curve(real.n_heads_, heads.feature_dim))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ random subspaces
def random_subspace_variance(
    pca: HeadPCA | np.ndarray | torch.Tensor,
    ks: Sequence[int],
    n_seeds: int = 20,
    seed: int = 0,
    within: Literal["span", "ambient"] = "span",
) -> pd.DataFrame:
    """Variance kept by random K-dim subspaces (no model evaluation; cheap, many seeds).

    Args:
        pca: a fitted :class:`~qk_subspace.decomposition.pca.HeadPCA` (``within="span"``: its principal
            span; ``"ambient"``: the feature space of its explicit heads), or head matrices ``[..., d, d]``
            for ``within="ambient"``.

    Returns:
        One row per (K, seed): ``K``, ``seed``, ``variance``.
    """
    if within not in ("span", "ambient"):
        raise ValueError(f"within must be 'span' or 'ambient', got {within!r}")
    if not isinstance(pca, HeadPCA):
        if within == "span":
            raise TypeError("within='span' needs a fitted HeadPCA")
        pca = HeadPCA(engine="gram").fit(pca)
    rng = np.random.default_rng(seed)
    rows = []
    for K in ks:
        for s in range(n_seeds):
            _, kept = random_ambient(pca, int(K), rng) if within == "ambient" else pca.random_mixing(K, rng)
            rows.append({"K": int(K), "seed": s, "variance": kept})
    return pd.DataFrame(rows)


def summarize_random(df: pd.DataFrame, columns: Sequence[str] = ("ratio", "variance")) -> pd.DataFrame:
    """Mean, std, min and max over seeds per K of a :func:`random_subspace_sweep` table."""
    agg = df.groupby("K")[list(columns)].agg(["mean", "std", "min", "max"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    return agg.reset_index()
