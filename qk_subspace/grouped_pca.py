"""PCA across heads computed from their Gram matrix, globally or separately per layer.

Given ``n`` heads with feature vectors ``x_1..x_n`` (never needed explicitly) and their Gram matrix
``Gram[i, j] = <x_i, x_j>``, PCA is the eigendecomposition of the centred Gram ``J Gram J``
(``J = I - 11^T/n``): eigenvalues ``lambda_k`` (``explained_variance_ = lambda / (n - 1)``, the
scikit-learn convention) and unit eigenvectors ``u_k``; head ``h``'s coefficient on component ``k``
is ``u_k[h] sqrt(lambda_k)``. Every reconstruction is a *mixing matrix* over heads:

    x_h(K) = sum_j A[h, j] x_j,      A = 11^T/n + U_K U_K^T           # K < rank; A = I at K >= rank

so it can be formed in whatever representation the heads have (raw matrices, or factored circuits
``W_Q W_K^T`` that are never materialised; see :mod:`qk_subspace.circuit_pca`).

``groupby="layer"``: one PCA per layer (block-diagonal ``A``), the same ``K`` in every layer.
``cumulative_variance_[K-1]`` is then the pooled within-layer fraction
``sum_l sum_{k<=K} lambda_{l,k} / sum_l sum_k lambda_{l,k}``; ``global_variance_explained(K)`` is
``1 - SSE(K) / SST``, with ``SST`` the sum of squares about the *global* mean head, the measure
under which per-layer and global PCA compare (the per-layer means get credit).

Parameter count (:func:`pca_parameter_count`): a dense representation with ``D`` numbers per head
matrix stores, for global PCA with K components, ``D`` (mean) + ``K D`` (components) + ``n K``
(coefficients); for per-layer PCA ``n_layers (D + K D)`` + ``n K``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from .subspace import ZERO_VARIANCE_RTOL, components_for_threshold, validate_k

__all__ = ["GramPCA", "LayerwisePCA", "matched_global_k", "pca_parameter_count"]

GroupBy = Literal["layer"] | None


def _check_groupby(groupby: Any) -> None:
    if groupby not in (None, "layer"):
        raise ValueError(f"groupby must be None (one PCA over all heads) or 'layer', got {groupby!r}")


def _sign_fix(U: np.ndarray) -> np.ndarray:
    """Flip eigenvector columns so that each one's largest-magnitude entry is positive."""
    if U.size == 0:
        return U
    idx = np.abs(U).argmax(axis=0)
    s = np.sign(U[idx, np.arange(U.shape[1])])
    return U * np.where(s == 0, 1.0, s)


class GramPCA:
    """PCA across ``n`` heads from their Gram matrix, optionally per group (the shared engine).

    Fitted attributes (``m`` = heads per group; one group when ``groupby is None``):
        head_shape_: e.g. ``(n_layers, n_heads)``.
        n_heads_: heads in total; groups_: list of index arrays into the flat heads.
        gram_: ``[n, n]`` float64 Gram matrix.
        eigvals_: ``[n_groups, m]`` eigenvalues of the centred group Gram, descending (>= 0).
        eigvecs_: ``[n_groups, m, m]`` matching unit eigenvectors (columns, signs fixed).
        n_components_: ``m``; n_nonzero_components_: max over groups of non-zero eigenvalues.
        explained_variance_: ``eigvals / (m - 1)``; shape ``[m]`` (global) or ``[n_groups, m]``.
        explained_variance_ratio_: within-group fractions, same shape.
        cumulative_variance_: ``[m]``, pooled fraction with K per group (see module doc).
        coefficients_: ``[n, m]``, each head's coefficients in its group's components.
        total_ss_: sum of squares about the global mean head; within_ss_: about the group means.
    """

    def __init__(self, groupby: GroupBy = None) -> None:
        _check_groupby(groupby)
        self.groupby = groupby

    def _fit_gram(self, gram: torch.Tensor | np.ndarray, head_shape: Sequence[int]) -> GramPCA:
        G = np.asarray(gram.detach().cpu() if isinstance(gram, torch.Tensor) else gram, dtype=np.float64)
        n = G.shape[0]
        if G.shape != (n, n):
            raise ValueError(f"gram must be square [n, n], got {G.shape}")
        if not np.all(np.isfinite(G)):
            raise ValueError("gram contains NaN or Inf values")
        head_shape = tuple(int(s) for s in head_shape)
        if int(np.prod(head_shape)) != n:
            raise ValueError(f"head_shape {head_shape} does not match {n} heads")
        G = 0.5 * (G + G.T)
        if self.groupby == "layer":
            if len(head_shape) != 2:
                raise ValueError(f"groupby='layer' needs heads shaped [n_layers, n_heads], got {head_shape}")
            groups = [
                np.arange(layer * head_shape[1], (layer + 1) * head_shape[1])
                for layer in range(head_shape[0])
            ]
        else:
            groups = [np.arange(n)]
        m = len(groups[0])
        if m < 2:
            raise ValueError(f"PCA across heads needs at least 2 heads per group, got {m}")
        eigvals = np.zeros((len(groups), m))
        eigvecs = np.zeros((len(groups), m, m))
        coefs = np.zeros((n, m))
        within = 0.0
        for gi, idx in enumerate(groups):
            Gg = G[np.ix_(idx, idx)]
            J = np.eye(m) - 1.0 / m
            Gc = J @ Gg @ J
            w, U = np.linalg.eigh(0.5 * (Gc + Gc.T))
            order = np.argsort(w)[::-1]
            w, U = np.clip(w[order], 0.0, None), _sign_fix(U[:, order])
            eigvals[gi], eigvecs[gi] = w, U
            coefs[idx] = U * np.sqrt(w)
            within += float(np.trace(Gc))
        J = np.eye(n) - 1.0 / n
        self.gram_ = G
        self.head_shape_ = head_shape
        self.n_heads_ = n
        self.groups_ = groups
        self.eigvals_ = eigvals
        self.eigvecs_ = eigvecs
        self.n_components_ = m
        top = eigvals.max(axis=1, keepdims=True)
        nonzero = eigvals > ZERO_VARIANCE_RTOL * np.where(top > 0, top, 1.0)
        self._rank = nonzero.sum(axis=1)
        self.n_nonzero_components_ = int(self._rank.max())
        self.total_ss_ = float(np.trace(J @ G @ J))
        self.within_ss_ = within
        ev = eigvals / (m - 1)
        sums = eigvals.sum(axis=1, keepdims=True)
        ratio = eigvals / np.where(sums > 0, sums, 1.0)
        pooled = np.cumsum(eigvals.sum(axis=0)) / max(within, np.finfo(float).tiny)
        if self.groupby is None:
            ev, ratio = ev[0], ratio[0]
        self.explained_variance_ = ev
        self.explained_variance_ratio_ = ratio
        self.cumulative_variance_ = pooled
        self.coefficients_ = coefs
        return self

    # --------------------------------------------------------------- helpers
    def _check_fitted(self) -> None:
        if not hasattr(self, "eigvals_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit first")

    def global_variance_explained(self, K: int) -> float:
        """``1 - SSE(K) / SST`` with SST about the global mean head (comparable across groupings)."""
        self._check_fitted()
        K = validate_k(K, self.n_components_)
        sse = float(self.eigvals_[:, K:].sum())
        return 1.0 - sse / self.total_ss_ if self.total_ss_ > 0 else 1.0

    def variance_explained(self, K: int) -> float:
        """Fraction of the (pooled within-group) variance kept by the top-K components (K=0: 0)."""
        self._check_fitted()
        K = validate_k(K, self.n_components_)
        return float(self.cumulative_variance_[K - 1]) if K else 0.0

    def n_components_for(self, threshold: float) -> int:
        """Smallest K whose (pooled) cumulative explained variance reaches ``threshold`` (in (0, 1])."""
        self._check_fitted()
        return components_for_threshold(self.cumulative_variance_, threshold)

    def mixing_matrix(self, K: int | None = None, components: Sequence[int] | None = None) -> np.ndarray:
        """``A`` ``[n, n]`` with ``x_h(K) = sum_j A[h, j] x_j`` (block-diagonal per group).

        ``K`` keeps the top-K components of every group (``K >= rank`` gives ``A = I`` exactly);
        ``components`` keeps explicit component indices instead.
        """
        self._check_fitted()
        if (K is None) == (components is None):
            raise ValueError("give exactly one of K or components")
        n = self.n_heads_
        A = np.zeros((n, n))
        if K is not None:
            K = validate_k(K, self.n_components_)
        for gi, idx in enumerate(self.groups_):
            m = len(idx)
            if K is not None and self._rank[gi] <= K:
                block = np.eye(m)
            else:
                keep = np.arange(K) if K is not None else np.asarray(list(components), dtype=np.int64)  # type: ignore[arg-type]
                if keep.size and (keep.min() < 0 or keep.max() >= m):
                    raise ValueError(f"components: indices must be in [0, {m - 1}], got {keep.tolist()}")
                U = self.eigvecs_[gi][:, keep]
                block = np.full((m, m), 1.0 / m) + U @ U.T
            A[np.ix_(idx, idx)] = block
        return A

    def random_mixing_matrix(self, K: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Mixing matrix of a random K-dim subspace of each group's principal span (a null baseline).

        In every group a Haar-random orthonormal ``O`` (``[r, K]``, ``r`` = non-zero components) picks
        the subspace ``V^T O`` of the span of the centred heads; the centred heads are projected on
        it: ``x_h - mean = S O O^T V`` with scores ``S = U sqrt(lambda)``. Returns ``(A, fraction of
        pooled within-group variance kept)``; the fraction has expectation ``K / r``.
        """
        self._check_fitted()
        K = validate_k(K, self.n_components_)
        n = self.n_heads_
        A = np.zeros((n, n))
        kept = 0.0
        for gi, idx in enumerate(self.groups_):
            m, r = len(idx), int(self._rank[gi])
            lam = self.eigvals_[gi][:r]
            if r <= K:
                A[np.ix_(idx, idx)] = np.eye(m)
                kept += float(lam.sum())
                continue
            O, _ = np.linalg.qr(rng.standard_normal((r, r)))
            O = O[:, :K]
            U = self.eigvecs_[gi][:, :r]
            sq = np.sqrt(lam)
            M = (U * sq) @ O @ O.T @ (U / sq).T
            A[np.ix_(idx, idx)] = np.full((m, m), 1.0 / m) + M
            kept += float(np.sum((O.T * lam) @ O * np.eye(K)))  # trace(O^T diag(lam) O)
        return A, kept / max(self.within_ss_, np.finfo(float).tiny)


def pca_parameter_count(K: int, D: int, n_heads_total: int, n_groups: int = 1) -> int:
    """Numbers stored by a PCA reconstruction: ``n_groups (D + K D)`` (means, components) ``+ n K``."""
    return int(n_groups * (D + K * D) + n_heads_total * K)


def matched_global_k(K_group: int, D: int, n_heads_total: int, n_groups: int, max_k: int) -> int:
    """Largest global K whose parameter count does not exceed per-group PCA with ``K_group`` per group."""
    budget = pca_parameter_count(K_group, D, n_heads_total, n_groups)
    K = (budget - D) // (D + n_heads_total)
    return int(max(0, min(K, max_k)))


class LayerwisePCA(GramPCA):
    """Raw-space PCA of ``W_QK`` per layer (what ``HeadPCA(groupby="layer")`` returns).

    ``fit(W)`` with ``W`` ``[n_layers, n_heads, d, d]``; ``reconstruct(K)`` returns the same shape
    (float64) with the top-K components *of each layer* (K=0: every head becomes its layer's mean).
    Fitted attributes: those of :class:`GramPCA` plus ``matrix_shape_`` and ``X_`` (``[n, d*d]``).
    """

    def __init__(self, n_components: int | None = None, groupby: GroupBy = "layer") -> None:
        super().__init__(groupby=groupby)
        self.n_components = n_components

    def fit(self, W: torch.Tensor | np.ndarray) -> LayerwisePCA:
        arr = (
            W.detach().to("cpu", torch.float64).numpy()
            if isinstance(W, torch.Tensor)
            else np.asarray(W, dtype=np.float64)
        )
        if arr.ndim != 4 or arr.shape[-1] != arr.shape[-2]:
            raise ValueError(f"W must have shape [n_layers, n_heads, d, d], got {tuple(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("W contains NaN or Inf values")
        self.matrix_shape_ = (int(arr.shape[-2]), int(arr.shape[-1]))
        self.X_ = arr.reshape(arr.shape[0] * arr.shape[1], -1)
        self._device = W.device if isinstance(W, torch.Tensor) else torch.device("cpu")
        return self._fit_gram(self.X_ @ self.X_.T, arr.shape[:2])  # type: ignore[return-value]

    def reconstruct(self, K: int | None = None, components: Sequence[int] | None = None) -> torch.Tensor:
        """Heads rebuilt from their layer's mean and top-K components: ``[n_layers, n_heads, d, d]``."""
        A = self.mixing_matrix(K=K, components=components)
        X = A @ self.X_
        return torch.from_numpy(X).reshape(*self.head_shape_, *self.matrix_shape_).to(self._device)

    def reconstruct_random(self, K: int, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        """A random K-dim subspace per layer (see :meth:`GramPCA.random_mixing_matrix`)."""
        A, kept = self.random_mixing_matrix(K, rng)
        X = A @ self.X_
        return torch.from_numpy(X).reshape(*self.head_shape_, *self.matrix_shape_).to(self._device), kept

    def __repr__(self) -> str:
        if hasattr(self, "eigvals_"):
            return (
                f"LayerwisePCA(groupby={self.groupby!r}, n_heads={self.n_heads_}, "
                f"per_group={self.n_components_}, nonzero={self.n_nonzero_components_})"
            )
        return f"LayerwisePCA(groupby={self.groupby!r})"
