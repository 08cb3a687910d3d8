"""PCA across attention heads of their flattened circuit matrices.

``HeadPCA`` is a scikit-learn style estimator (built on :class:`sklearn.decomposition.PCA`
with a full SVD) over ``n = n_layers * n_heads`` samples, each a flattened ``d_head x d_head``
matrix (``d_head**2`` features).

Components and the report's "K=144": PCA centres the data, and ``n`` centred samples span at
most ``n - 1`` dimensions. scikit-learn still returns ``min(n, d_head**2)`` components, so for
GPT-2 small (144 heads, 4096 features) there are 144 components of which the last has zero
variance (up to round-off). "K = all" in the report (K=144) is therefore the same as K=143: both
reconstruct every head exactly. ``n_nonzero_components_`` counts the components that carry
variance; any ``K >= n_nonzero_components_`` reconstructs the fitted heads exactly (float64 error
below 1e-10). ``K = 0`` replaces every head by the mean head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA

__all__ = ["HeadPCA", "validate_k"]

#: Components whose variance is below this fraction of the largest are counted as zero.
ZERO_VARIANCE_RTOL = 1e-12


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


class HeadPCA:
    """PCA across heads of their ``d x d`` circuit matrices.

    Args:
        n_components: number of components to keep (``None``: all, ``min(n_heads, d*d)``).
        space: ``"raw"`` (default, this class: PCA of ``W_Q^T W_K``) or ``"circuit"``: returns a
            :class:`qk_subspace.circuit_pca.CircuitPCA` (gauge-invariant PCA of ``W_Q W_K^T``).
        groupby: ``None`` (default, one PCA across all heads) or ``"layer"``: returns a
            :class:`qk_subspace.grouped_pca.LayerwisePCA` (one PCA per layer), or a per-layer
            ``CircuitPCA`` with ``space="circuit"``.

    Fitted attributes (after :meth:`fit`):
        head_shape_: leading shape of the fitted tensor, e.g. ``(n_layers, n_heads)``.
        matrix_shape_: ``(d, d)``, the shape of one head's matrix.
        n_heads_: number of heads (samples).
        n_components_: number of components computed.
        n_nonzero_components_: components with non-zero variance (at most ``n_heads_ - 1``).
        mean_: ``[d*d]`` float64, the mean head (flattened).
        components_: ``[n_components_, d*d]`` float64, orthonormal rows, by decreasing variance.
        explained_variance_: ``[n_components_]``.
        explained_variance_ratio_: ``[n_components_]``, fractions of the total variance.
        cumulative_variance_: ``[n_components_]``, running sum of the ratios.
        coefficients_: ``[n_heads_, n_components_]``, PCA coordinates of the fitted heads.
        pca_: the underlying fitted :class:`sklearn.decomposition.PCA`.
    """

    def __new__(
        cls, n_components: int | None = None, *, space: str = "raw", groupby: str | None = None
    ) -> Any:
        # HeadPCA(space="circuit") / HeadPCA(groupby="layer") return the Gram-based estimators
        # (qk_subspace.circuit_pca.CircuitPCA, qk_subspace.grouped_pca.LayerwisePCA); the default
        # raw, global PCA is this class.
        if space not in ("raw", "circuit"):
            raise ValueError(
                f"space must be 'raw' (W_Q^T W_K) or 'circuit' (W_Q W_K^T), got {space!r}; "
                "for the canonical basis fit a raw HeadPCA inside qs.canonical_gauge(model)"
            )
        if groupby not in (None, "layer"):
            raise ValueError(f"groupby must be None or 'layer', got {groupby!r}")
        if space == "circuit":
            from .circuit_pca import CircuitPCA

            return CircuitPCA(n_components=n_components, groupby=groupby)  # type: ignore[arg-type]
        if groupby == "layer":
            from .grouped_pca import LayerwisePCA

            return LayerwisePCA(n_components=n_components, groupby="layer")
        return super().__new__(cls)

    def __init__(
        self, n_components: int | None = None, *, space: str = "raw", groupby: str | None = None
    ) -> None:
        self.n_components = n_components
        self.space = space
        self.groupby = groupby

    # ------------------------------------------------------------------ fitting
    def fit(self, W: torch.Tensor | np.ndarray) -> HeadPCA:
        """Fit on ``W`` of shape ``[..., d, d]`` (e.g. ``[n_layers, n_heads, d_head, d_head]``)."""
        X, head_shape, matrix_shape = self._flatten(W, fitting=True)
        n, f = X.shape
        if n < 2:
            raise ValueError(f"W: PCA across heads needs at least 2 heads, got {n}")
        max_comp = min(n, f)
        if self.n_components is not None:
            validate_k(self.n_components, max_comp, name="n_components")
            if self.n_components < 1:
                raise ValueError(f"n_components must be in [1, {max_comp}], got {self.n_components}")
        self.pca_ = PCA(n_components=self.n_components or max_comp, svd_solver="full")
        with np.errstate(invalid="ignore", divide="ignore"):  # all heads identical: 0/0 ratios, fixed below
            self.coefficients_ = self.pca_.fit_transform(X)
        self.head_shape_: tuple[int, ...] = head_shape
        self.matrix_shape_: tuple[int, int] = matrix_shape
        self.n_heads_ = n
        self.n_components_ = int(self.pca_.n_components_)
        self.mean_ = self.pca_.mean_
        self.components_ = self.pca_.components_
        self.explained_variance_ = self.pca_.explained_variance_
        # identical heads have zero total variance: report ratios of 0 instead of NaN
        self.explained_variance_ratio_ = np.nan_to_num(self.pca_.explained_variance_ratio_, nan=0.0)
        self.cumulative_variance_ = np.cumsum(self.explained_variance_ratio_)
        top = float(self.explained_variance_[0]) if self.n_components_ else 0.0
        self.n_nonzero_components_ = int(np.sum(self.explained_variance_ > ZERO_VARIANCE_RTOL * top))
        self._device = W.device if isinstance(W, torch.Tensor) else torch.device("cpu")
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise RuntimeError("HeadPCA is not fitted yet: call fit(W) first")

    def _flatten(
        self, W: torch.Tensor | np.ndarray, fitting: bool = False
    ) -> tuple[np.ndarray, tuple[int, ...], tuple[int, int]]:
        arr = (
            W.detach().to("cpu", torch.float64).numpy()
            if isinstance(W, torch.Tensor)
            else np.asarray(W, dtype=np.float64)
        )
        if arr.ndim < 3 or arr.shape[-1] != arr.shape[-2]:
            raise ValueError(
                f"W must have shape [..., d, d] (e.g. [n_layers, n_heads, d_head, d_head]), got {tuple(arr.shape)}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"W must be finite, but it contains {int(np.sum(~np.isfinite(arr)))} NaN or Inf values"
            )
        if not fitting:
            self._check_fitted()
            if tuple(arr.shape[-2:]) != self.matrix_shape_:
                raise ValueError(
                    f"W: expected matrices of shape {self.matrix_shape_}, got {tuple(arr.shape[-2:])}"
                )
        head_shape = tuple(int(s) for s in arr.shape[:-2])
        matrix_shape = (int(arr.shape[-2]), int(arr.shape[-1]))
        return arr.reshape(-1, matrix_shape[0] * matrix_shape[1]), head_shape, matrix_shape

    # -------------------------------------------------------------- transforms
    def transform(self, W: torch.Tensor | np.ndarray) -> np.ndarray:
        """PCA coefficients ``[n, n_components_]`` of heads ``W [..., d, d]``."""
        X, _, _ = self._flatten(W)
        return (X - self.mean_) @ self.components_.T

    def inverse_transform(self, coefficients: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Map coefficients ``[n, c]`` (``c <= n_components_``) back to matrices ``[n, d, d]`` (float64)."""
        self._check_fitted()
        C = np.asarray(
            coefficients.detach().cpu() if isinstance(coefficients, torch.Tensor) else coefficients,
            dtype=np.float64,
        )
        if C.ndim != 2 or C.shape[1] > self.n_components_:
            raise ValueError(
                f"coefficients must have shape [n, c] with c <= {self.n_components_}, got {C.shape}"
            )
        X = self.mean_ + C @ self.components_[: C.shape[1]]
        return torch.from_numpy(X.reshape(-1, *self.matrix_shape_))

    def n_components_for(self, threshold: float) -> int:
        """Smallest K whose cumulative explained variance reaches ``threshold`` (in (0, 1])."""
        self._check_fitted()
        return components_for_threshold(self.cumulative_variance_, threshold)

    def reconstruct(self, K: int | None = None, components: Sequence[int] | None = None) -> torch.Tensor:
        """Rebuild every fitted head from the mean plus a subset of components.

        Args:
            K: keep the top-``K`` components (``0 <= K <= n_heads_``; 0 = mean head; values above
                ``n_components_`` keep all of them). Give exactly one of ``K`` and ``components``.
            components: explicit component indices to keep (e.g. an importance ordering).

        Returns:
            float64 tensor of the fitted shape ``[*head_shape_, d, d]`` on the fitted device.
        """
        self._check_fitted()
        if (K is None) == (components is None):
            raise ValueError("reconstruct: give exactly one of K or components")
        if K is not None:
            K = validate_k(K, self.n_heads_)
            keep = np.arange(min(K, self.n_components_))
        else:
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
        X = self.mean_ + self.coefficients_[:, keep] @ self.components_[keep]
        out = torch.from_numpy(np.ascontiguousarray(X)).reshape(*self.head_shape_, *self.matrix_shape_)
        return out.to(self._device)

    def reconstruction_error(self, W: torch.Tensor | np.ndarray, K: int) -> float:
        """Frobenius norm of ``W - reconstruct(K)`` over all heads."""
        W_t = W if isinstance(W, torch.Tensor) else torch.from_numpy(np.asarray(W))
        return float(torch.linalg.vector_norm(W_t.to("cpu", torch.float64) - self.reconstruct(K).cpu()))

    def __repr__(self) -> str:
        if hasattr(self, "components_"):
            return (
                f"HeadPCA(n_heads={self.n_heads_}, matrix_shape={self.matrix_shape_}, "
                f"n_components={self.n_components_}, nonzero={self.n_nonzero_components_})"
            )
        return f"HeadPCA(n_components={self.n_components})"
