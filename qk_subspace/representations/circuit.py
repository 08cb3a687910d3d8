"""The gauge-invariant representation: every head's full QK circuit ``C_h = W_Q W_K^T`` (``"qk-circuit"``).

``W_QK = W_Q^T W_K`` (the report's d_head x d_head matrix) changes under a per-head change of basis
``W_Q -> W_Q G, W_K -> W_K G^{-T}`` that leaves the model unchanged (see :mod:`qk_subspace.edits.gauge`);
``C_h`` does not. PCA across heads of the flattened ``C_h`` needs only their Gram matrix, which is
computable in d_head space without ever forming a ``d_model x d_model`` matrix:

    <C_i, C_j>_F = trace(C_i^T C_j) = trace((W_Q_i^T W_Q_j) (W_K_j^T W_K_i))

(cost ``n^2 d_model d_head^2`` multiply-adds, memory ``O(n d_head^2)`` per block). Components and
reconstructions are combinations of the heads' own circuits (a :class:`~qk_subspace.representations.mixing.Mixing`):
``C_h(K) = sum_j A[h, j] W_Q_j W_K_j^T``, kept in that factored form.

Edit: ``W_Q`` is set to the least-squares solution against the model's current ``W_K``
(:class:`~qk_subspace.edits.circuit.CircuitEdit`); its residual is the part of the target circuit
outside ``span(W_K)``.

Rotary models (e.g. stories260K): the rotations act between ``W_Q`` and the dot product, so the score
at relative offset ``p`` is ``x W_Q M_p W_K^T y``; ``C_h = W_Q W_K^T`` is the offset-0 circuit. It is
still invariant under every gauge that preserves the model (those commute with ``M_p``), so circuit-space
PCA is gauge-invariant for rotary models too, and the injected ``W_Q_new`` transforms covariantly
(``W_Q_new -> W_Q_new G``), so the injected model's perplexity is gauge-invariant as well. What the PCA
sees is the offset-0 circuit; the offset-``p`` circuits ``W_Q M_p W_K^T`` are not separately analysed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..edits.circuit import CircuitEdit
from ..model.weights import attention_factors, flatten_heads
from .base import Representation
from .heads import Heads
from .mixing import Mixing

__all__ = ["CircuitHeads", "CircuitRepresentation", "circuit_gram", "materialize_circuits"]


def circuit_gram(
    W_Q: torch.Tensor,
    W_K: torch.Tensor,
    W_Q2: torch.Tensor | None = None,
    W_K2: torch.Tensor | None = None,
    chunk: int = 8,
) -> torch.Tensor:
    """Gram matrix ``<C_i, C'_j>_F`` of circuits ``C = W_Q W_K^T``, computed in d_head space.

    Args:
        W_Q, W_K: ``[..., d_model, d_head]`` (n heads); W_Q2, W_K2: a second set (default the first).
        chunk: heads per row block (memory ``2 * chunk * m * d_head^2`` float64).

    Returns:
        ``[n, m]`` float64: ``trace((W_Q_i^T W_Q2_j)(W_K2_j^T W_K_i))``.
    """
    A_q, A_k = flatten_heads(W_Q), flatten_heads(W_K)
    B_q = A_q if W_Q2 is None else flatten_heads(W_Q2)
    B_k = A_k if W_K2 is None else flatten_heads(W_K2)
    if A_q.shape != A_k.shape or B_q.shape != B_k.shape or A_q.shape[1:] != B_q.shape[1:]:
        raise ValueError("circuit_gram: W_Q and W_K must have the same shape [..., d_model, d_head]")
    symmetric = W_Q2 is None and W_K2 is None
    n, m, dh = A_q.shape[0], B_q.shape[0], A_q.shape[-1]
    # [d_model, heads * d_head]: one GEMM per row block gives every W_Q_i^T W_Q_j at once
    aq, ak = (F.permute(1, 0, 2).reshape(F.shape[1], -1) for F in (A_q, A_k))
    bq, bk = (F.permute(1, 0, 2).reshape(F.shape[1], -1) for F in (B_q, B_k))
    out = torch.empty(n, m, dtype=torch.float64)
    for s in range(0, n, chunk):
        c = min(chunk, n - s)
        j0 = s if symmetric else 0  # the self-Gram is symmetric: compute the blocks right of the diagonal
        qq = aq[:, s * dh : (s + c) * dh].T @ bq[:, j0 * dh :]  # [c*dh, (m-j0)*dh]
        kk = ak[:, s * dh : (s + c) * dh].T @ bk[:, j0 * dh :]
        block = (qq * kk).reshape(c, dh, m - j0, dh).sum(dim=(1, 3))
        out[s : s + c, j0:] = block
        if symmetric:
            out[j0:, s : s + c] = block.T
    return out


def materialize_circuits(W_Q: torch.Tensor, W_K: torch.Tensor) -> torch.Tensor:
    """Every circuit explicitly: ``[..., d_model, d_model]`` float64 (memory ``n d_model^2``)."""
    return W_Q.to(torch.float64) @ W_K.to(torch.float64).transpose(-1, -2)


class CircuitHeads(Heads):
    """Every head's circuit ``W_Q W_K^T`` kept as its factors ``[*head_shape, d_model, d_head]`` (float64).

    Args:
        W_Q, W_K: the factors (grouped-query keys repeated per query head).
        materialize: form the circuits explicitly (``n d_model^2`` numbers) for the Gram matrix instead
            of the d_head-space trace formula (for checking; same result).
    """

    representation = "qk-circuit"

    def __init__(self, W_Q: torch.Tensor, W_K: torch.Tensor, materialize: bool = False) -> None:
        W_Q, W_K = (torch.as_tensor(w).detach().cpu().to(torch.float64) for w in (W_Q, W_K))
        if W_Q.shape != W_K.shape or W_Q.ndim < 3:
            raise ValueError(
                f"W_Q and W_K must have the same shape [..., d_model, d_head], "
                f"got {tuple(W_Q.shape)} and {tuple(W_K.shape)}"
            )
        if not (torch.isfinite(W_Q).all() and torch.isfinite(W_K).all()):
            raise ValueError("W_Q / W_K contain NaN or Inf values")
        self.W_Q, self.W_K = W_Q, W_K
        self.head_shape = tuple(int(s) for s in W_Q.shape[:-2])
        self.d_model, self.d_head = int(W_Q.shape[-2]), int(W_Q.shape[-1])
        self.feature_dim = self.d_model**2
        self.materialize_gram = materialize
        self._gram: np.ndarray | None = None

    def gram(self) -> np.ndarray:
        """``[n, n]`` float64 ``<C_i, C_j>_F``, symmetrised (``(G + G^T) / 2``: the blocks of the trace
        formula are not bit-symmetric), so the PCA and the edit use the very same matrix."""
        if self._gram is None:
            if self.materialize_gram:
                C = materialize_circuits(flatten_heads(self.W_Q), flatten_heads(self.W_K)).reshape(
                    -1, self.d_model**2
                )
                G = (C @ C.T).numpy()
            else:
                G = circuit_gram(self.W_Q, self.W_K).numpy()
            self._gram = 0.5 * (G + G.T)
        return self._gram

    @property
    def circuit_norms(self) -> np.ndarray:
        """``[n_heads]`` Frobenius norms of the circuits."""
        return np.sqrt(np.clip(np.diag(self.gram()), 0, None))

    def materialize(self, mixing: Mixing) -> torch.Tensor:
        """Materialised ``C_h = sum_j A[h, j] C_j``: ``[*head_shape, d_model, d_model]`` float64."""
        A = torch.from_numpy(mixing.matrix())
        C = materialize_circuits(flatten_heads(self.W_Q), flatten_heads(self.W_K))
        return torch.einsum("hj,jab->hab", A, C).reshape(*self.head_shape, self.d_model, self.d_model)

    def __repr__(self) -> str:
        return f"CircuitHeads(head_shape={self.head_shape}, d_model={self.d_model}, d_head={self.d_head})"


class CircuitRepresentation(Representation):
    """``C_h = W_Q W_K^T`` per head (gauge-invariant), realised through ``W_Q`` by least squares."""

    name = "qk-circuit"
    circuit = "qk"
    space = "circuit"
    description = "W_Q W_K^T per head (gauge-invariant d_model x d_model circuits), least squares through W_Q"
    supports = frozenset({"clustering", "groupby", "baselines", "gauges"})
    gauge_invariant = True

    def heads(self, model: Any) -> CircuitHeads:
        W_Q, W_K = attention_factors(model, ("W_Q", "W_K"))
        return CircuitHeads(W_Q, W_K)

    def edit(self, model: Any, heads: Heads, mixing: Mixing, **options: Any) -> CircuitEdit:
        if not isinstance(heads, CircuitHeads):
            raise TypeError(f"qk-circuit edits need CircuitHeads, got {type(heads).__name__}")
        if options:
            raise TypeError(f"qk-circuit edits take no options, got {sorted(options)}")
        return CircuitEdit(model, heads.W_Q, heads.W_K, heads.gram(), mixing.matrix(), name="circuit edit")

    def residual_columns(self, edit: Any) -> dict[str, float]:
        """``max_residual`` and ``mean_residual``: the largest and mean relative residual over heads."""
        return {"max_residual": float(edit.residual.max()), "mean_residual": float(edit.residual.mean())}
