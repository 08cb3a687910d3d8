"""Every reconstruction of the heads is a head-mixing matrix: :class:`Mixing`.

For ``n`` heads with features ``x_1..x_n`` (a head's circuit in some representation, flattened),
a reconstruction rebuilds every head from the heads themselves:

    x_rec[h] = sum_j A[h, j] x_j          # A: [n, n]

* top-K PCA (global or per layer): ``A = 11^T/m + U_K U_K^T`` per group of ``m`` heads, ``U_K`` the
  top-K unit eigenvectors of the centred Gram matrix (:meth:`~qk_subspace.decomposition.pca.HeadPCA.mixing`);
* a chosen set of components: the same with those eigenvectors;
* K = 0, every head the mean head: ``A = 11^T/m``;
* clusters, every head replaced by its representative: one 1 per row (:class:`Replacement`);
* a random K-dimensional subspace of the heads' span (:meth:`~qk_subspace.decomposition.pca.HeadPCA.random_mixing`);
* K = all: exactly ``A = I`` (:attr:`Mixing.is_identity`).

Because ``A`` acts on heads, not on features, the same reconstruction can be formed in any
representation: explicitly (``A @ X`` for head-space matrices) or in factored form
(``C_h = sum_j A[h, j] W_Q_j W_K_j^T`` without forming ``d_model x d_model`` matrices).

A mixing also says which heads it changes (:attr:`Mixing.edited`: rows that are not ``e_h``);
edits of head-space circuits leave the others untouched. :meth:`Mixing.apply` may use a
factored form of the product for the data the mixing was derived from (a PCA's own
coefficients and components), which is the numerically preferred way to form it there.

The one reconstruction that is not a mixing of heads is the random subspace of the whole feature
space (:class:`FeatureProjection`, a null baseline for head-space representations only).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["DenseMixing", "FeatureProjection", "Mixing", "Replacement", "Restricted"]


class Mixing:
    """Base class: a reconstruction ``X_rec = A X`` of ``n_heads`` heads (``X``: ``[n_heads, D]``)."""

    def __init__(self, n_heads: int) -> None:
        self.n_heads = int(n_heads)

    def matrix(self) -> np.ndarray:
        """``A`` ``[n_heads, n_heads]`` float64."""
        raise NotImplementedError

    def apply(self, X: np.ndarray) -> np.ndarray:
        """``A @ X`` for features ``X`` ``[n_heads, D]`` (float64)."""
        return self.matrix() @ X

    @property
    def edited(self) -> np.ndarray:
        """bool ``[n_heads]``: heads whose reconstruction is not the head itself (all, unless known)."""
        return np.ones(self.n_heads, dtype=bool)

    @property
    def is_identity(self) -> bool:
        """Whether ``A = I`` exactly (every head reconstructed as itself: "K = all")."""
        return bool(np.array_equal(self.matrix(), np.eye(self.n_heads)))

    def restrict(self, heads: np.ndarray) -> Restricted:
        """The same reconstruction for the heads in the bool mask ``heads`` ``[n_heads]`` only."""
        return Restricted(self, heads)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_heads={self.n_heads})"


class DenseMixing(Mixing):
    """An explicit mixing matrix ``A`` ``[n, n]``.

    Args:
        A: the matrix.
        exact: optional ``(X, product)``: for that very array ``X`` (identity, not equality),
            :meth:`apply` returns ``product()`` instead of ``A @ X`` (a factored form of the same
            product, e.g. a PCA's ``mean + coefficients @ components`` for its fitted data).
    """

    def __init__(
        self, A: np.ndarray, exact: tuple[np.ndarray, Callable[[], np.ndarray]] | None = None
    ) -> None:
        A = np.asarray(A, dtype=np.float64)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"a mixing matrix must be square [n_heads, n_heads], got shape {A.shape}")
        super().__init__(A.shape[0])
        self._A = A
        self._exact = exact

    def matrix(self) -> np.ndarray:
        return self._A

    def apply(self, X: np.ndarray) -> np.ndarray:
        if self._exact is not None and X is self._exact[0]:
            return self._exact[1]()
        return self._A @ X


class Replacement(Mixing):
    """Every head ``h`` replaced by head ``source[h]`` (one 1 per row of ``A``), e.g. cluster representatives."""

    def __init__(self, source: np.ndarray) -> None:
        src = np.asarray(source, dtype=np.int64).reshape(-1)
        super().__init__(len(src))
        if src.size and (src.min() < 0 or src.max() >= len(src)):
            raise ValueError(f"source: head indices must be in [0, {len(src) - 1}], got {src.tolist()}")
        self.source = src

    def matrix(self) -> np.ndarray:
        return np.eye(self.n_heads)[self.source]

    def apply(self, X: np.ndarray) -> np.ndarray:
        return X[self.source]

    @property
    def edited(self) -> np.ndarray:
        return self.source != np.arange(self.n_heads)

    @property
    def is_identity(self) -> bool:
        return not bool(self.edited.any())


class Restricted(Mixing):
    """``inner`` for the heads of a mask; every other head is reconstructed as itself."""

    def __init__(self, inner: Mixing, heads: np.ndarray) -> None:
        super().__init__(inner.n_heads)
        mask = np.asarray(heads, dtype=bool).reshape(-1)
        if mask.shape != (inner.n_heads,):
            raise ValueError(f"heads: a mask of {inner.n_heads} heads is needed, got shape {mask.shape}")
        self.inner, self.mask = inner, mask

    def matrix(self) -> np.ndarray:
        return np.where(self.mask[:, None], self.inner.matrix(), np.eye(self.n_heads))

    def apply(self, X: np.ndarray) -> np.ndarray:
        return np.where(self.mask[:, None], self.inner.apply(X), X)

    @property
    def edited(self) -> np.ndarray:
        return self.inner.edited & self.mask


class FeatureProjection(Mixing):
    """Projection of the centred heads on a subspace of the *feature* space: ``mean + (X - mean) Q Q^T``.

    Not a mixing of heads (:meth:`matrix` raises): usable only with representations whose heads are
    explicit head-space matrices. ``Q`` is ``[D, K]`` with orthonormal columns.
    """

    def __init__(self, n_heads: int, Q: np.ndarray) -> None:
        super().__init__(n_heads)
        self.Q = np.asarray(Q, dtype=np.float64)

    def matrix(self) -> np.ndarray:
        raise TypeError(
            "a projection on a random subspace of the feature space is not a mixing of heads; it applies "
            "only to head-space representations (qk, qk-canonical, ov)"
        )

    def apply(self, X: np.ndarray) -> np.ndarray:
        mean = X.mean(axis=0)
        return mean + ((X - mean) @ self.Q) @ self.Q.T

    @property
    def is_identity(self) -> bool:
        return False
