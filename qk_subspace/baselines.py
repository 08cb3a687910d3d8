"""Null baselines: does the real PCA curve differ from chance?

* **K = 0** (every head replaced by the mean head): the row ``K=0`` of every sweep.
* **Random K-dimensional subspace** (:func:`random_subspace_sweep`, :func:`random_subspace_variance`):
  instead of the top-K principal directions, a Haar-random orthonormal basis of the same size, several
  seeds, mean and spread. ``within="span"`` (default) draws it inside the span of the centred heads
  (``r`` = non-zero components, expected variance kept ``K / r``): it isolates whether the *ordering*
  of PCA matters. ``within="ambient"`` (raw space only) draws it in the full ``d_head^2``-dimensional
  matrix space (expected ``K / d_head^2``). Reconstructions are injected exactly like ``sweep_k``.
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
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .circuit_pca import CircuitPCA, circuit_factors
from .circuits import qk_matrices
from .evaluation import PerplexityResult, perplexity
from .grouped_pca import GramPCA, LayerwisePCA
from .spaces import Space, space_context
from .subspace import validate_k
from .sweeps import evaluate_edit, evaluate_parameter_edit

__all__ = [
    "marchenko_pastur_curve",
    "marchenko_pastur_quantiles",
    "random_subspace_sweep",
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
def _curve(pca: GramPCA) -> np.ndarray:
    return np.asarray(pca.cumulative_variance_, dtype=np.float64)


def spectrum_nulls(
    model: HookedTransformer,
    space: Space = "raw",
    n_seeds: int = 5,
    seed: int = 0,
    groupby: str | None = None,
) -> pd.DataFrame:
    """Cumulative explained-variance curves of the real heads and of the null models.

    Returns a long DataFrame: ``curve`` in ``real``, ``shuffled``, ``gaussian`` (mean over seeds
    with ``std``), ``random_subspace`` (expected ``K / r``) and, raw/canonical global only,
    ``marchenko_pastur``; ``K`` (1-based), ``cumulative_variance``, ``std``.
    """
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

    with space_context(model, space):
        if space == "circuit":
            W_Q, W_K = circuit_factors(model)
            real: GramPCA = CircuitPCA(groupby=groupby).fit((W_Q, W_K))  # type: ignore[arg-type]

            def fit_null(kind: str) -> np.ndarray:
                Q, K = W_Q.reshape(-1, *W_Q.shape[-2:]).clone(), W_K.reshape(-1, *W_K.shape[-2:]).clone()
                for F in (Q, K):
                    for h in range(F.shape[0]):
                        flat = F[h].flatten()
                        if kind == "shuffled":
                            new = flat[torch.from_numpy(rng.permutation(flat.numel()))]
                        else:
                            g = torch.from_numpy(rng.standard_normal(flat.numel()))
                            new = g * flat.norm() / g.norm()
                        F[h] = new.reshape(F[h].shape)
                return _curve(CircuitPCA(groupby=groupby).fit((Q.reshape(W_Q.shape), K.reshape(W_K.shape))))  # type: ignore[arg-type]

            n_feat = model.cfg.d_model**2
        else:
            W = qk_matrices(model).cpu()
            real = LayerwisePCA(groupby=groupby).fit(W)  # type: ignore[arg-type]

            def fit_null(kind: str) -> np.ndarray:
                X = W.reshape(-1, W.shape[-1] ** 2).clone()
                for h in range(X.shape[0]):
                    if kind == "shuffled":
                        X[h] = X[h][torch.from_numpy(rng.permutation(X.shape[1]))]
                    else:
                        g = torch.from_numpy(rng.standard_normal(X.shape[1]))
                        X[h] = g * X[h].norm() / g.norm()
                return _curve(LayerwisePCA(groupby=groupby).fit(X.reshape(W.shape)))  # type: ignore[arg-type]

            n_feat = model.cfg.d_head**2
    add("real", _curve(real))
    for kind in ("shuffled", "gaussian"):
        curves = np.stack([fit_null(kind) for _ in range(n_seeds)])
        add(kind, curves.mean(axis=0), curves.std(axis=0, ddof=1) if n_seeds > 1 else None)
    r = np.maximum(real._rank, 1)
    m = real.n_components_
    expected = np.array([np.sum(np.minimum(k, r) / r * real.eigvals_.sum(axis=1)) for k in range(1, m + 1)])
    add("random_subspace", expected / max(real.within_ss_, np.finfo(float).tiny))
    if space != "circuit" and groupby is None:
        add("marchenko_pastur", marchenko_pastur_curve(real.n_heads_, n_feat))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ random subspaces
def _ambient_reconstruction(X: np.ndarray, K: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Project centred raw heads ``X [n, D]`` on a random K-dim subspace of R^D."""
    mean = X.mean(axis=0)
    Xc = X - mean
    Q, _ = np.linalg.qr(rng.standard_normal((X.shape[1], max(K, 1))))
    Q = Q[:, :K]
    P = Xc @ Q
    tot = float(np.sum(Xc**2))
    return mean + P @ Q.T, float(np.sum(P**2)) / tot if tot > 0 else 0.0


def random_subspace_variance(
    pca: GramPCA | np.ndarray | torch.Tensor,
    ks: Sequence[int],
    n_seeds: int = 20,
    seed: int = 0,
    within: Literal["span", "ambient"] = "span",
) -> pd.DataFrame:
    """Variance kept by random K-dim subspaces (no model evaluation; cheap, many seeds).

    Args:
        pca: a fitted :class:`GramPCA` (``LayerwisePCA``/``CircuitPCA``) for ``within="span"``, or raw
            heads ``[..., d, d]`` for ``within="ambient"``.

    Returns:
        One row per (K, seed): ``K``, ``seed``, ``variance``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for K in ks:
        for s in range(n_seeds):
            if within == "span":
                if not isinstance(pca, GramPCA):
                    raise TypeError("within='span' needs a fitted GramPCA (LayerwisePCA or CircuitPCA)")
                _, kept = pca.random_mixing_matrix(K, rng)
            elif within == "ambient":
                arr = (
                    pca.detach().cpu().double().numpy()
                    if isinstance(pca, torch.Tensor)
                    else np.asarray(pca, float)
                )
                _, kept = _ambient_reconstruction(arr.reshape(-1, arr.shape[-1] * arr.shape[-2]), K, rng)
            else:
                raise ValueError(f"within must be 'span' or 'ambient', got {within!r}")
            rows.append({"K": int(K), "seed": s, "variance": kept})
    return pd.DataFrame(rows)


def random_subspace_sweep(
    model: HookedTransformer,
    tokens: torch.Tensor,
    ks: Sequence[int],
    *,
    space: Space = "raw",
    groupby: str | None = None,
    n_seeds: int = 3,
    seed: int = 0,
    within: Literal["span", "ambient"] = "span",
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
) -> pd.DataFrame:
    """Perplexity when every head is rebuilt from a *random* K-dim subspace, evaluated like ``sweep_k``.

    Returns:
        One row per (K, seed): ``K``, ``seed``, ``space``, ``groupby``, ``within``, ``variance``
        (fraction of the fitted variance kept), ``ppl``, ``mean_nll``, ``ratio``, ``ratio_low``,
        ``ratio_high``, ``max_residual``. Summarise with :func:`summarize_random`.
    """
    if within == "ambient" and space == "circuit":
        raise ValueError(
            "within='ambient' is only available for raw/canonical spaces (d_model^2 is too large)"
        )
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    with space_context(model, space):
        if baseline is None:
            baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
        if space == "circuit":
            pca: Any = CircuitPCA(groupby=groupby).fit(model)  # type: ignore[arg-type]
        else:
            W = qk_matrices(model)
            pca = LayerwisePCA(groupby=groupby).fit(W)  # type: ignore[arg-type]
        device = model.W_U.device
        for K in tqdm(list(ks), desc=f"random subspaces ({space})", disable=not progress):
            K = validate_k(K, pca.n_components_)
            for s in range(n_seeds):
                common: dict[str, Any] = {
                    "batch_size": batch_size,
                    "progress": progress,
                    "n_boot": n_boot,
                    "desc": f"rand K={K} s={s}",
                }
                if within == "ambient":
                    X, kept = _ambient_reconstruction(pca.X_, K, rng)  # type: ignore[attr-defined]
                    target = torch.from_numpy(X).reshape(W.shape).to(device)
                    res = evaluate_edit(model, tokens, target, baseline, **common)
                else:
                    A, kept = pca.random_mixing_matrix(K, rng)
                    if space == "circuit":
                        res = evaluate_parameter_edit(
                            model, tokens, pca.inject(model, A=A), baseline, **common
                        )  # type: ignore[attr-defined]
                    else:
                        target = torch.from_numpy(A @ pca.X_).reshape(W.shape).to(device)  # type: ignore[attr-defined]
                        res = evaluate_edit(model, tokens, target, baseline, **common)
                rows.append(
                    {
                        "K": K,
                        "seed": s,
                        "space": space,
                        "groupby": groupby or "none",
                        "within": within,
                        "variance": kept,
                        **res,
                    }
                )
    df = pd.DataFrame(rows)
    df.attrs["baseline_ppl"] = baseline.ppl
    return df


def summarize_random(df: pd.DataFrame, columns: Sequence[str] = ("ratio", "variance")) -> pd.DataFrame:
    """Mean, std, min and max over seeds per K of a :func:`random_subspace_sweep` table."""
    agg = df.groupby("K")[list(columns)].agg(["mean", "std", "min", "max"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    return agg.reset_index()
