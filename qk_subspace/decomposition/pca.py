"""PCA across attention heads: one estimator for every representation, global or per layer.

``HeadPCA`` is a scikit-learn style estimator over ``n`` heads (samples), each the flattened circuit
of one head in some representation (:mod:`qk_subspace.representations`). It is fitted on
:class:`~qk_subspace.representations.heads.Heads` (or on plain matrices ``[..., d, d]``) and its
reconstructions are mixing matrices over heads (:class:`~qk_subspace.representations.mixing.Mixing`),
so a representation can form them explicitly or in factored form.

Two engines compute the same decomposition:

* ``"svd"``: :class:`sklearn.decomposition.PCA` (full SVD) on the explicit features; the
  reconstruction of the fitted heads is formed as ``mean + coefficients @ components``.
  Used by default for explicit head-space matrices and one PCA over all heads.
* ``"gram"``: the eigendecomposition of the centred Gram matrix ``J Gram J`` (``J = I - 11^T/m``)
  of each group of ``m`` heads; needs only ``<x_i, x_j>``, so it serves factored representations
  (``W_Q W_K^T``, never materialised) and per-layer PCA (``groupby="layer"``, block-diagonal mixing).
  With eigenvalues ``lambda_k`` (``explained_variance_ = lambda / (m - 1)``, the scikit-learn
  convention) and unit eigenvectors ``u_k``, head ``h``'s coefficient on component ``k`` is
  ``u_k[h] sqrt(lambda_k)`` and the top-K reconstruction is ``A = 11^T/m + U_K U_K^T``.

Components and the report's "K=144": PCA centres the data, and ``m`` centred samples span at
most ``m - 1`` dimensions. scikit-learn still returns ``min(m, D)`` components, so for GPT-2 small
(144 heads, 4096 features) there are 144 components of which the last has zero variance (up to
round-off). "K = all" in the report (K=144) is therefore the same as K=143: both reconstruct every
head exactly. ``n_nonzero_components_`` counts the components that carry variance; any
``K >= n_nonzero_components_`` gives the mixing matrix ``A = I``. ``K = 0`` replaces every head by
the mean head (of its layer, per layer).

``groupby="layer"``: ``cumulative_variance_[K-1]`` is the pooled within-layer fraction
``sum_l sum_{k<=K} lambda_{l,k} / sum_l sum_k lambda_{l,k}``; :meth:`HeadPCA.global_variance_explained`
is ``1 - SSE(K) / SST`` with ``SST`` about the *global* mean head, the measure under which per-layer
and global PCA compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from sklearn.decomposition import PCA

from ..representations.heads import Heads, as_heads
from ..representations.mixing import DenseMixing, Mixing

__all__ = ["ZERO_VARIANCE_RTOL", "HeadPCA", "components_for_threshold", "validate_k"]

#: Components whose variance is below this fraction of the largest are counted as zero.
ZERO_VARIANCE_RTOL = 1e-12

GroupBy = Literal["layer"] | None


def components_for_threshold(cumulative_variance: np.ndarray, threshold: float) -> int:
    """Smallest K with ``cumulative_variance[K - 1] >= threshold`` (``threshold`` in (0, 1]);
    the number of components if none reaches it."""
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    reached = np.nonzero(np.asarray(cumulative_variance) >= float(threshold) - 1e-12)[0]
    return int(reached[0]) + 1 if len(reached) else len(cumulative_variance)


def validate_k(K: Any, n_heads: int, name: str = "K") -> int:
    """Check that ``K`` is an integer in ``[0, n_heads]`` and return it as ``int``."""
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)):
        raise TypeError(f"{name} must be an integer in [0, {n_heads}], got {K!r} ({type(K).__name__})")
    if not 0 <= int(K) <= n_heads:
        raise ValueError(f"{name} must be in [0, {n_heads}] (0 = mean head, {n_heads} = all), got {K}")
    return int(K)


def _sign_fix(U: np.ndarray) -> np.ndarray:
    """Flip eigenvector columns so that each one's largest-magnitude entry is positive."""
    if U.size == 0:
        return U
    idx = np.abs(U).argmax(axis=0)
    s = np.sign(U[idx, np.arange(U.shape[1])])
    return U * np.where(s == 0, 1.0, s)


class HeadPCA:
    """PCA across heads of their circuits in one representation (see the module docstring).

    Args:
        n_components: components to keep (``None``: all). The ``"gram"`` engine computes all of them
            and reports the first ``n_components``.
        groupby: ``None`` (one PCA across all heads) or ``"layer"`` (one PCA per layer, the same K in
            every layer; needs heads shaped ``[n_layers, n_heads]``).
        engine: ``"auto"`` (``"svd"`` for explicit features and ``groupby=None``, else ``"gram"``),
            ``"svd"`` or ``"gram"``.

    Fitted attributes (after :meth:`fit`; ``m`` = heads per group, ``n`` heads in all):
        heads_: the fitted :class:`~qk_subspace.representations.heads.Heads`.
        engine_: the engine used.
        head_shape_: leading shape of the heads, e.g. ``(n_layers, n_heads)``.
        matrix_shape_: ``(d, d)`` of one head for explicit matrices, else ``None``.
        n_heads_, n_features_: heads, and numbers per head.
        groups_: list of flat head-index arrays (one group, or one per layer).
        n_components_: components computed per group; n_nonzero_components_: the most with non-zero
            variance in any group (at most ``m - 1``).
        explained_variance_: ``[n_components_]`` (``[n_layers, n_components_]`` per layer).
        explained_variance_ratio_: fractions of each group's variance, same shape.
        cumulative_variance_: ``[n_components_]``, running (pooled) fraction.
        coefficients_: ``[n, n_components_]``, each head's coordinates in its group's components.
        eigvals_, eigvecs_: ``[n_groups, m]`` eigenvalues of the centred group Gram (descending) and
            ``[n_groups, m, m]`` unit eigenvectors (columns).
        total_ss_, within_ss_: sums of squares about the global mean head and the group means.
        mean_, components_: ``[D]`` and ``[n_components_, D]`` (``"svd"`` engine only).
        gram_: ``[n, n]`` Gram matrix (``"gram"`` engine only); pca_: the sklearn PCA (``"svd"`` only).
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        groupby: GroupBy = None,
        engine: Literal["auto", "svd", "gram"] = "auto",
    ) -> None:
        self.n_components = n_components
        self.groupby = groupby
        self.engine = engine
        self._validate_params()

    def _validate_params(self, max_components: int | None = None) -> None:
        """The one place where the estimator's parameters are checked: on construction, and in ``fit``
        against the data (``max_components``, the most components the heads allow)."""
        if self.groupby not in (None, "layer"):
            raise ValueError(
                f"groupby must be None (one PCA over all heads) or 'layer', got {self.groupby!r}"
            )
        if self.engine not in ("auto", "svd", "gram"):
            raise ValueError(f"engine must be 'auto', 'svd' or 'gram', got {self.engine!r}")
        if self.engine == "svd" and self.groupby is not None:
            raise ValueError(
                "engine='svd' fits one PCA over all heads; groupby='layer' needs engine='gram'/'auto'"
            )
        n = self.n_components
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer))):
            raise ValueError(f"n_components must be None or a positive integer, got {n!r}")
        if n is not None and max_components is not None:
            validate_k(n, max_components, name="n_components")
            if n < 1:
                raise ValueError(f"n_components must be in [1, {max_components}], got {n}")

    # ------------------------------------------------------------------ fitting
    def fit(self, heads: Heads | torch.Tensor | np.ndarray) -> HeadPCA:
        """Fit on :class:`~qk_subspace.representations.heads.Heads` or on matrices ``[..., d, d]``."""
        self._validate_params()
        H = as_heads(heads)
        engine = self.engine
        if engine == "auto":
            engine = "svd" if H.features is not None and self.groupby is None else "gram"
        if engine == "svd" and H.features is None:
            raise ValueError(
                f"engine='svd' needs explicit head matrices; the {H.representation!r} heads are factored: "
                "use engine='gram' (or 'auto')"
            )
        self.heads_ = H
        self.engine_ = engine
        self.head_shape_: tuple[int, ...] = tuple(H.head_shape)
        self.matrix_shape_: tuple[int, int] | None = getattr(H, "matrix_shape", None)
        self.n_heads_ = H.n_heads
        self.n_features_ = int(H.feature_dim)
        self._eigen: tuple[np.ndarray, np.ndarray] | None = None
        if engine == "svd":
            self._fit_svd(H)
        else:
            self._fit_gram(H)
        return self

    def _fit_svd(self, H: Heads) -> None:
        X = H.features
        assert X is not None
        n, f = X.shape
        if n < 2:
            raise ValueError(f"W: PCA across heads needs at least 2 heads, got {n}")
        max_comp = min(n, f)
        self._validate_params(max_comp)
        self.pca_ = PCA(n_components=self.n_components or max_comp, svd_solver="full")
        with np.errstate(invalid="ignore", divide="ignore"):  # all heads identical: 0/0 ratios, fixed below
            self.coefficients_ = self.pca_.fit_transform(X)
        self.groups_ = [np.arange(n)]
        self.n_components_ = int(self.pca_.n_components_)
        self.mean_ = self.pca_.mean_
        self.components_ = self.pca_.components_
        self.explained_variance_ = self.pca_.explained_variance_
        # identical heads have zero total variance: report ratios of 0 instead of NaN
        self.explained_variance_ratio_ = np.nan_to_num(self.pca_.explained_variance_ratio_, nan=0.0)
        self.cumulative_variance_ = np.cumsum(self.explained_variance_ratio_)
        top = float(self.explained_variance_[0]) if self.n_components_ else 0.0
        self.n_nonzero_components_ = int(np.sum(self.explained_variance_ > ZERO_VARIANCE_RTOL * top))
        self._rank = np.array([self.n_nonzero_components_])
        self.total_ss_ = self.within_ss_ = float(np.sum((X - self.mean_) ** 2))

    def _fit_gram(self, H: Heads) -> None:
        G = np.asarray(H.gram(), dtype=np.float64)
        n = G.shape[0]
        if not np.all(np.isfinite(G)):
            raise ValueError("gram contains NaN or Inf values")
        G = 0.5 * (G + G.T)
        if self.groupby == "layer":
            if len(self.head_shape_) != 2:
                raise ValueError(
                    f"groupby='layer' needs heads shaped [n_layers, n_heads], got {self.head_shape_}"
                )
            per = self.head_shape_[1]
            groups = [np.arange(layer * per, (layer + 1) * per) for layer in range(self.head_shape_[0])]
        else:
            groups = [np.arange(n)]
        m = len(groups[0])
        if m < 2:
            raise ValueError(f"PCA across heads needs at least 2 heads per group, got {m}")
        self._validate_params(m)
        eigvals, eigvecs = np.zeros((len(groups), m)), np.zeros((len(groups), m, m))
        coefs = np.zeros((n, m))
        within = 0.0
        for gi, idx in enumerate(groups):
            J = np.eye(m) - 1.0 / m
            Gc = J @ G[np.ix_(idx, idx)] @ J
            w, U = np.linalg.eigh(0.5 * (Gc + Gc.T))
            order = np.argsort(w)[::-1]
            w, U = np.clip(w[order], 0.0, None), _sign_fix(U[:, order])
            eigvals[gi], eigvecs[gi] = w, U
            coefs[idx] = U * np.sqrt(w)
            within += float(np.trace(Gc))
        J = np.eye(n) - 1.0 / n
        self.gram_, self.groups_ = G, groups
        self._eigen = (eigvals, eigvecs)
        top = eigvals.max(axis=1, keepdims=True)
        self._rank = (eigvals > ZERO_VARIANCE_RTOL * np.where(top > 0, top, 1.0)).sum(axis=1)
        self.n_nonzero_components_ = int(self._rank.max())
        self.total_ss_ = float(np.trace(J @ G @ J))
        self.within_ss_ = within
        ev = eigvals / (m - 1)
        sums = eigvals.sum(axis=1, keepdims=True)
        ratio = eigvals / np.where(sums > 0, sums, 1.0)
        pooled = np.cumsum(eigvals.sum(axis=0)) / max(within, np.finfo(float).tiny)
        c = min(m, self.n_components or m)
        self.n_components_ = c
        self.explained_variance_ = ev[0, :c] if self.groupby is None else ev[:, :c]
        self.explained_variance_ratio_ = ratio[0, :c] if self.groupby is None else ratio[:, :c]
        self.cumulative_variance_ = pooled[:c]
        self.coefficients_ = coefs[:, :c]

    # --------------------------------------------------------------- helpers
    def _check_fitted(self) -> None:
        if not hasattr(self, "heads_"):
            raise RuntimeError("HeadPCA is not fitted yet: call fit(...) first")

    @property
    def eigvals_(self) -> np.ndarray:
        return self._spectrum()[0]

    @property
    def eigvecs_(self) -> np.ndarray:
        return self._spectrum()[1]

    def _spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-group eigenvalues and unit eigenvectors of the centred Gram (the SVD's ``S^2`` and ``U``)."""
        self._check_fitted()
        if self._eigen is None:  # svd engine: U = coefficients / S, zero where S = 0
            n = self.n_heads_
            S = np.zeros(n)
            S[: self.n_components_] = self.pca_.singular_values_
            U = np.zeros((n, n))
            nz = S[: self.n_components_] > 0
            U[:, : self.n_components_][:, nz] = self.coefficients_[:, nz] / S[: self.n_components_][nz]
            self._eigen = (S[None] ** 2, U[None])
        return self._eigen

    @property
    def max_k_(self) -> int:
        """The largest K of this fit: heads per group (K = all)."""
        self._check_fitted()
        return len(self.groups_[0])

    def n_components_for(self, threshold: float) -> int:
        """Smallest K whose (pooled) cumulative explained variance reaches ``threshold`` (in (0, 1])."""
        self._check_fitted()
        return components_for_threshold(self.cumulative_variance_, threshold)

    def variance_explained(self, K: int) -> float:
        """Fraction of the (pooled within-group) variance kept by the top-K components (K=0: 0)."""
        self._check_fitted()
        K = min(validate_k(K, self.max_k_), self.n_components_)
        return float(self.cumulative_variance_[K - 1]) if K else 0.0

    def global_variance_explained(self, K: int) -> float:
        """``1 - SSE(K) / SST`` with SST about the global mean head (comparable across groupings)."""
        if self.engine_ == "svd":
            return self.variance_explained(K)
        K = validate_k(K, self.max_k_)
        sse = float(self.eigvals_[:, K:].sum())
        return 1.0 - sse / self.total_ss_ if self.total_ss_ > 0 else 1.0

    def variance_of(self, components: Sequence[int]) -> float:
        """Fraction of the variance carried by the given components (sum of their ratios; global PCA)."""
        self._check_fitted()
        keep = list(components)
        return float(np.sum(np.asarray(self.explained_variance_ratio_)[keep])) if keep else 0.0

    def _keep(self, K: int | None, components: Sequence[int] | None) -> np.ndarray:
        if (K is None) == (components is None):
            raise ValueError("give exactly one of K or components")
        if K is not None:
            return np.arange(min(validate_k(K, self.max_k_), self.n_components_))
        comps = list(components)  # type: ignore[arg-type]
        bad = [c for c in comps if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
        if bad:
            raise TypeError(
                f"components: indices must be integers in [0, {self.n_components_ - 1}], got {bad[:5]}"
            )
        keep = np.asarray(comps, dtype=np.int64)
        if keep.size and (keep.min() < 0 or keep.max() >= self.n_components_):
            raise ValueError(
                f"components: indices must be in [0, {self.n_components_ - 1}], got {keep.tolist()}"
            )
        if len(np.unique(keep)) != keep.size:
            raise ValueError(f"components: indices must be distinct, got {keep.tolist()}")
        return keep

    # ------------------------------------------------------------- reconstruction
    def mixing(self, K: int | None = None, components: Sequence[int] | None = None) -> Mixing:
        """The reconstruction from the mean and a subset of components, as a mixing of heads.

        Args:
            K: keep the top-``K`` components of every group (``0 <= K <= max_k_``; 0 = mean head;
                ``K >= n_nonzero_components_`` gives exactly ``A = I``). Give one of ``K`` and ``components``.
            components: explicit component indices to keep (e.g. an importance ordering).
        """
        self._check_fitted()
        keep = self._keep(K, components)
        eigvecs = self._spectrum()[1]
        n = self.n_heads_
        A = np.zeros((n, n))
        for gi, idx in enumerate(self.groups_):
            m = len(idx)
            if set(range(int(self._rank[gi]))) <= set(keep.tolist()):
                A[np.ix_(idx, idx)] = np.eye(m)
            else:
                U = eigvecs[gi][:, keep]
                A[np.ix_(idx, idx)] = np.full((m, m), 1.0 / m) + U @ U.T
        if self.engine_ == "svd":  # the fitted heads are formed as mean + coefficients @ components
            X = self.heads_.features
            assert X is not None
            return DenseMixing(
                A, exact=(X, lambda: self.mean_ + self.coefficients_[:, keep] @ self.components_[keep])
            )
        return DenseMixing(A)

    def random_mixing(self, K: int, rng: np.random.Generator) -> tuple[Mixing, float]:
        """A random K-dim subspace of each group's principal span (a null baseline).

        In every group a Haar-random orthonormal ``O`` (``[r, K]``, ``r`` = non-zero components) picks
        the subspace ``V^T O`` of the span of the centred heads; the centred heads are projected on
        it: ``x_h - mean = S O O^T V`` with scores ``S = U sqrt(lambda)``. Returns ``(mixing, fraction
        of pooled within-group variance kept)``; the fraction has expectation ``K / r``.
        """
        self._check_fitted()
        K = validate_k(K, self.max_k_)
        eigvals, eigvecs = self._spectrum()
        n = self.n_heads_
        A = np.zeros((n, n))
        kept = 0.0
        for gi, idx in enumerate(self.groups_):
            m, r = len(idx), int(self._rank[gi])
            lam = eigvals[gi][:r]
            if r <= K:
                A[np.ix_(idx, idx)] = np.eye(m)
                kept += float(lam.sum())
                continue
            O, _ = np.linalg.qr(rng.standard_normal((r, r)))
            O = O[:, :K]
            U = eigvecs[gi][:, :r]
            sq = np.sqrt(lam)
            A[np.ix_(idx, idx)] = np.full((m, m), 1.0 / m) + (U * sq) @ O @ O.T @ (U / sq).T
            kept += float(np.sum((O.T * lam) @ O * np.eye(K)))  # trace(O^T diag(lam) O)
        return DenseMixing(A), kept / max(self.within_ss_, np.finfo(float).tiny)

    def reconstruct(self, K: int | None = None, components: Sequence[int] | None = None) -> torch.Tensor:
        """Every fitted head rebuilt from the mean plus a subset of components (see :meth:`mixing`).

        Returns:
            float64 ``[*head_shape_, d, d]`` for explicit matrices (on their device), or the
            materialised circuits (e.g. ``[*head_shape_, d_model, d_model]`` for ``qk-circuit``).
        """
        self._check_fitted()
        return self.heads_.materialize(self.mixing(K=K, components=components))

    # ------------------------------------------------------- explicit features (svd engine)
    def _check_svd(self, what: str) -> None:
        self._check_fitted()
        if self.engine_ != "svd":
            raise RuntimeError(f"{what} needs the 'svd' engine (explicit features, groupby=None)")

    def transform(self, W: torch.Tensor | np.ndarray) -> np.ndarray:
        """PCA coefficients ``[n, n_components_]`` of heads ``W [..., d, d]``."""
        self._check_svd("transform")
        X = as_heads(W)
        if getattr(X, "matrix_shape", None) != self.matrix_shape_:
            raise ValueError(
                f"W: expected matrices of shape {self.matrix_shape_}, got {getattr(X, 'matrix_shape', None)}"
            )
        assert X.features is not None
        return (X.features - self.mean_) @ self.components_.T

    def inverse_transform(self, coefficients: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Map coefficients ``[n, c]`` (``c <= n_components_``) back to matrices ``[n, d, d]`` (float64)."""
        self._check_svd("inverse_transform")
        C = np.asarray(
            coefficients.detach().cpu() if isinstance(coefficients, torch.Tensor) else coefficients,
            dtype=np.float64,
        )
        if C.ndim != 2 or C.shape[1] > self.n_components_:
            raise ValueError(
                f"coefficients must have shape [n, c] with c <= {self.n_components_}, got {C.shape}"
            )
        X = self.mean_ + C @ self.components_[: C.shape[1]]
        assert self.matrix_shape_ is not None
        return torch.from_numpy(X.reshape(-1, *self.matrix_shape_))

    def reconstruction_error(self, W: torch.Tensor | np.ndarray, K: int) -> float:
        """Frobenius norm of ``W - reconstruct(K)`` over all heads."""
        W_t = W if isinstance(W, torch.Tensor) else torch.from_numpy(np.asarray(W))
        return float(torch.linalg.vector_norm(W_t.to("cpu", torch.float64) - self.reconstruct(K).cpu()))

    def __repr__(self) -> str:
        if hasattr(self, "heads_"):
            return (
                f"HeadPCA({self.heads_.representation or 'matrices'}, engine={self.engine_!r}, "
                f"groupby={self.groupby!r}, n_heads={self.n_heads_}, n_components={self.n_components_}, "
                f"nonzero={self.n_nonzero_components_})"
            )
        return f"HeadPCA(n_components={self.n_components}, groupby={self.groupby!r}, engine={self.engine!r})"
