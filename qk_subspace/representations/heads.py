"""The heads of a model in one representation: what a decomposition is fitted on.

A :class:`Heads` object holds ``n`` heads (``head_shape``, e.g. ``(n_layers, n_heads)``) whose
circuits live in a space of ``feature_dim`` numbers each. It gives their Gram matrix
``gram[i, j] = <x_i, x_j>`` and forms reconstructions (:class:`~qk_subspace.decomposition.mixing.Mixing`).
Two kinds exist:

* :class:`DenseHeads`: explicit ``d x d`` matrices per head (``W_Q^T W_K``, ``W_V^T W_O^T``);
  ``features`` is the ``[n, d*d]`` array;
* factored heads (``CircuitHeads`` in :mod:`qk_subspace.representations.circuit`): ``W_Q W_K^T``
  kept as its factors, ``features`` is ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .mixing import Mixing

__all__ = ["DenseHeads", "Heads", "as_heads"]


class Heads:
    """``n_heads`` heads in one representation (see the module docstring).

    Attributes:
        representation: the registered name of the representation (``None``: plain matrices).
        head_shape: e.g. ``(n_layers, n_heads)``; heads are numbered in flat (row-major) order.
        feature_dim: numbers per head in this representation (``d_head**2``, ``d_model**2``, ...).
        features: ``[n_heads, feature_dim]`` float64, or ``None`` for factored heads.
    """

    representation: str | None = None
    head_shape: tuple[int, ...]
    feature_dim: int
    features: np.ndarray | None = None

    @property
    def n_heads(self) -> int:
        return int(np.prod(self.head_shape))

    def gram(self) -> np.ndarray:
        """``[n_heads, n_heads]`` float64 Gram matrix of the flattened head circuits."""
        raise NotImplementedError

    def materialize(self, mixing: Mixing) -> torch.Tensor:
        """The reconstruction ``x_rec = A x`` of every head as explicit matrices ``[*head_shape, ...]``."""
        raise NotImplementedError


class DenseHeads(Heads):
    """Explicit per-head matrices ``[*head_shape, d, d]`` (a tensor or an array; kept in float64).

    Reconstructions keep the device of a tensor input.
    """

    def __init__(self, matrices: torch.Tensor | np.ndarray, representation: str | None = None) -> None:
        arr = (
            matrices.detach().to("cpu", torch.float64).numpy()
            if isinstance(matrices, torch.Tensor)
            else np.asarray(matrices, dtype=np.float64)
        )
        if arr.ndim < 3 or arr.shape[-1] != arr.shape[-2]:
            raise ValueError(
                "W must have shape [..., d, d] (e.g. [n_layers, n_heads, d_head, d_head]), "
                f"got {tuple(arr.shape)}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"W must be finite, but it contains {int(np.sum(~np.isfinite(arr)))} NaN or Inf values"
            )
        self.representation = representation
        self.head_shape = tuple(int(s) for s in arr.shape[:-2])
        self.matrix_shape: tuple[int, int] = (int(arr.shape[-2]), int(arr.shape[-1]))
        self.feature_dim = self.matrix_shape[0] * self.matrix_shape[1]
        self.features = arr.reshape(-1, self.feature_dim)
        self.device = matrices.device if isinstance(matrices, torch.Tensor) else torch.device("cpu")

    def gram(self) -> np.ndarray:
        assert self.features is not None
        return self.features @ self.features.T

    def materialize(self, mixing: Mixing) -> torch.Tensor:
        """``[*head_shape, d, d]`` float64 on the input's device: ``mixing.apply(features)``."""
        assert self.features is not None
        X = np.ascontiguousarray(mixing.apply(self.features))
        return torch.from_numpy(X).reshape(*self.head_shape, *self.matrix_shape).to(self.device)

    def __repr__(self) -> str:
        return f"DenseHeads({self.representation!r}, head_shape={self.head_shape}, matrix_shape={self.matrix_shape})"


def as_heads(data: Any) -> Heads:
    """``data`` as :class:`Heads`: a ``Heads`` object as is, matrices ``[..., d, d]`` as :class:`DenseHeads`."""
    if isinstance(data, Heads):
        return data
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return DenseHeads(data)
    raise TypeError(
        "expected Heads (e.g. qs.representations.get('qk-circuit').heads(model)) or matrices [..., d, d]; "
        f"got {type(data).__name__}"
    )
