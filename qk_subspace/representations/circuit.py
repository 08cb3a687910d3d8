"""The gauge-invariant representation: every head's full QK circuit (``"qk-circuit"``).

``W_QK = W_Q^T W_K`` (the report's d_head x d_head matrix) changes under a per-head change of basis
``W_Q -> W_Q G, W_K -> W_K G^{-T}`` that leaves the model unchanged (see :mod:`qk_subspace.edits.gauge`);
the circuit does not:

* without rotary embeddings the circuit is ``C_h = W_Q W_K^T`` ``[d_model, d_model]``;
* with rotary embeddings it is the tuple of per-pair complex circuits ``Z_pair = w_Q w_K^H`` (plus
  ``W_Q W_K^T`` of the unrotated dimensions, if any), which determines the score at every relative
  offset and is fixed exactly by the gauges that preserve a rotary model (:mod:`qk_subspace.model.rotary`).
  The offset-0 circuit ``W_Q W_K^T`` alone would be fixed by gauges that change the model.

PCA across heads of the flattened circuits needs only their Gram matrix, computable in d_head space
without forming a ``d_model x d_model`` matrix (summed over the parts, real part of the complex ones):

    <C_i, C_j>_F = Re trace(C_i^H C_j) = Re trace((W_Q_i^H W_Q_j) (W_K_j^H W_K_i))

(cost ``n^2 d_model d_head^2`` multiply-adds, memory ``O(n d_head^2)`` per block). Components and
reconstructions are combinations of the heads' own circuits (a :class:`~qk_subspace.representations.mixing.Mixing`):
``C_h(K) = sum_j A[h, j] C_j``.

Edits (``realisation=``):

* ``"joint"`` (default, :class:`~qk_subspace.edits.circuit_joint.JointCircuitEdit`): ``W_Q`` and ``W_K``
  are set together to the best factorisation of the target (truncated SVD per part and key/value group,
  the Eckart-Young optimum), in the gauge closest to the original weights;
* ``"query"`` (:class:`~qk_subspace.edits.circuit.CircuitEdit`): ``W_Q`` alone, by least squares against
  the current ``W_K`` (the part of the target outside ``span(W_K)`` is lost; never better than ``"joint"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..edits.circuit import CircuitEdit
from ..edits.circuit_joint import JointCircuitEdit
from ..edits.head_edit import HeadEdit
from ..model.rotary import CircuitLayout, circuit_layout, circuit_parts
from ..model.weights import attention_factors, flatten_heads
from .base import Representation
from .heads import Heads
from .mixing import Mixing

__all__ = [
    "REALISATIONS",
    "CircuitHeads",
    "CircuitRepresentation",
    "circuit_gram",
    "materialize_circuits",
]

#: How a circuit-space target is written into the model (see the module docstring).
REALISATIONS = ("joint", "query")


def circuit_gram(
    W_Q: torch.Tensor,
    W_K: torch.Tensor,
    W_Q2: torch.Tensor | None = None,
    W_K2: torch.Tensor | None = None,
    chunk: int = 8,
) -> torch.Tensor:
    """Gram matrix ``Re <C_i, C'_j>_F`` of circuits ``C = W_Q W_K^H``, computed in d_head space.

    Args:
        W_Q, W_K: ``[..., d_model, r]`` (n heads), real or complex; W_Q2, W_K2: a second set (default the first).
        chunk: heads per row block (memory ``2 * chunk * m * r^2`` numbers).

    Returns:
        ``[n, m]`` float64: ``Re trace((W_Q_i^H W_Q2_j)(W_K2_j^H W_K_i))``.
    """
    A_q, A_k = _flat(W_Q), _flat(W_K)
    B_q = A_q if W_Q2 is None else _flat(W_Q2)
    B_k = A_k if W_K2 is None else _flat(W_K2)
    if A_q.shape != A_k.shape or B_q.shape != B_k.shape or A_q.shape[1:] != B_q.shape[1:]:
        raise ValueError("circuit_gram: W_Q and W_K must have the same shape [..., d_model, d_head]")
    symmetric = W_Q2 is None and W_K2 is None
    n, m, dh = A_q.shape[0], B_q.shape[0], A_q.shape[-1]
    # [d_model, heads * d_head]: one GEMM per row block gives every W_Q_i^H W_Q_j at once
    aq, ak = (F.permute(1, 0, 2).reshape(F.shape[1], -1) for F in (A_q, A_k))
    bq, bk = (F.permute(1, 0, 2).reshape(F.shape[1], -1) for F in (B_q, B_k))
    out = torch.empty(n, m, dtype=torch.float64)
    for s in range(0, n, chunk):
        c = min(chunk, n - s)
        j0 = s if symmetric else 0  # the self-Gram is symmetric: compute the blocks right of the diagonal
        qq = aq[:, s * dh : (s + c) * dh].conj().T @ bq[:, j0 * dh :]  # [c*dh, (m-j0)*dh]
        kk = ak[:, s * dh : (s + c) * dh].conj().T @ bk[:, j0 * dh :]
        block = (qq * kk.conj()).real.reshape(c, dh, m - j0, dh).sum(dim=(1, 3))
        out[s : s + c, j0:] = block
        if symmetric:
            out[j0:, s : s + c] = block.T
    return out


def _flat(W: torch.Tensor) -> torch.Tensor:
    return W.reshape(-1, *W.shape[-2:]) if W.is_complex() else flatten_heads(W)


def materialize_circuits(W_Q: torch.Tensor, W_K: torch.Tensor) -> torch.Tensor:
    """Every circuit explicitly: ``W_Q W_K^H`` ``[..., d_model, d_model]`` (float64 or complex128)."""
    if W_Q.is_complex():
        return W_Q.to(torch.complex128) @ W_K.to(torch.complex128).mH
    return W_Q.to(torch.float64) @ W_K.to(torch.float64).transpose(-1, -2)


class CircuitHeads(Heads):
    """Every head's invariant circuit, kept as its factors ``[*head_shape, d_model, d_head]`` (float64).

    Args:
        W_Q, W_K: the factors (grouped-query keys repeated per query head).
        layout: the parts of the circuit (:func:`~qk_subspace.model.rotary.circuit_layout`; default:
            the single ``W_Q W_K^T``, no rotary).
        materialize: form the circuits explicitly (``n d_model^2`` numbers per part) for the Gram matrix
            instead of the d_head-space trace formula (for checking; same result).
    """

    representation = "qk-circuit"

    def __init__(
        self,
        W_Q: torch.Tensor,
        W_K: torch.Tensor,
        materialize: bool = False,
        layout: CircuitLayout | None = None,
    ) -> None:
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
        d_head = self.d_head
        self.layout = layout or CircuitLayout.plain(d_head)
        if self.layout.d_head != d_head:
            raise ValueError(f"layout is for d_head={self.layout.d_head}, the factors have d_head={d_head}")
        self.feature_dim = self.d_model**2 * self.layout.feature_dim_per_model_dim_sq
        self.materialize_gram = materialize
        self._gram: np.ndarray | None = None

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(Q_part, K_part)`` ``[n, d_model, r]`` per part (complex ``r = 1`` per rotary pair, then the rest)."""
        Q, K = flatten_heads(self.W_Q), flatten_heads(self.W_K)
        return list(zip(circuit_parts(Q, self.layout), circuit_parts(K, self.layout), strict=True))

    def gram(self) -> np.ndarray:
        """``[n, n]`` float64 ``<C_i, C_j>_F`` summed over parts, symmetrised (``(G + G^T) / 2``: the blocks
        of the trace formula are not bit-symmetric), so the PCA and the edit use the very same matrix."""
        if self._gram is None:
            G = np.zeros((self.n_heads, self.n_heads))
            for Qp, Kp in self.parts():
                if self.materialize_gram:
                    C = materialize_circuits(Qp, Kp).reshape(self.n_heads, -1)
                    G += (C.conj() @ C.T).real.numpy()
                else:
                    G += circuit_gram(Qp, Kp).numpy()
            self._gram = 0.5 * (G + G.T)
        return self._gram

    @property
    def circuit_norms(self) -> np.ndarray:
        """``[n_heads]`` Frobenius norms of the circuits."""
        return np.sqrt(np.clip(np.diag(self.gram()), 0, None))

    def materialize(self, mixing: Mixing) -> torch.Tensor:
        """Materialised ``C_h = sum_j A[h, j] C_j``: ``[*head_shape, d_model, d_model]`` float64 without
        rotary; with rotary ``[*head_shape, n_parts, d_model, d_model]`` complex128 (the pairs, then the rest)."""
        A = torch.from_numpy(mixing.matrix())
        out = []
        for Qp, Kp in self.parts():
            C = materialize_circuits(Qp, Kp)
            out.append(torch.einsum("hj,jab->hab", A.to(C.dtype), C))
        if not self.layout.rotary:
            return out[0].reshape(*self.head_shape, self.d_model, self.d_model)
        Z = torch.stack([c.to(torch.complex128) for c in out], dim=1)
        return Z.reshape(*self.head_shape, self.layout.n_parts, self.d_model, self.d_model)

    def __repr__(self) -> str:
        return (
            f"CircuitHeads(head_shape={self.head_shape}, d_model={self.d_model}, d_head={self.d_head}, "
            f"circuit={self.layout.describe()!r})"
        )


class CircuitRepresentation(Representation):
    """The invariant circuit per head (rotary-aware), realised jointly through ``W_Q`` and ``W_K``."""

    name = "qk-circuit"
    circuit = "qk"
    space = "circuit"
    description = (
        "W_Q W_K^T per head (gauge-invariant d_model x d_model circuits; per rotary pair on rotary models), "
        "realised jointly through W_Q and W_K"
    )
    supports = frozenset({"clustering", "groupby", "baselines", "gauges"})
    gauge_invariant = True

    def heads(self, model: Any) -> CircuitHeads:
        W_Q, W_K = attention_factors(model, ("W_Q", "W_K"))
        return CircuitHeads(W_Q, W_K, layout=circuit_layout(model))

    def edit(self, model: Any, heads: Heads, mixing: Mixing, **options: Any) -> HeadEdit:
        """The edit realising ``mixing`` of ``heads``; option ``realisation="joint"`` (default) or ``"query"``."""
        if not isinstance(heads, CircuitHeads):
            raise TypeError(f"qk-circuit edits need CircuitHeads, got {type(heads).__name__}")
        realisation = options.pop("realisation", "joint")
        if options:
            raise TypeError(f"qk-circuit edits take only the option 'realisation', got {sorted(options)}")
        if realisation not in REALISATIONS:
            raise ValueError(f"realisation must be one of {list(REALISATIONS)}, got {realisation!r}")
        layout = circuit_layout(model)
        if heads.layout != layout:
            raise ValueError(
                f"the circuits were read as {heads.layout.describe()!r}, but the model's circuit is "
                f"{layout.describe()!r}"
            )
        if realisation == "query":
            return CircuitEdit(
                model, heads.W_Q, heads.W_K, heads.gram(), mixing.matrix(), name="circuit edit (W_Q)",
                layout=heads.layout,
            )  # fmt: skip
        return JointCircuitEdit(model, heads.W_Q, heads.W_K, mixing.matrix(), layout=heads.layout)

    def residual_columns(self, edit: Any) -> dict[str, Any]:
        """``max_residual`` and ``mean_residual`` (largest and mean relative residual over heads),
        ``residual_total`` (over all heads) and ``residual_per_head`` (``[n_layers][n_heads]``)."""
        return {
            "max_residual": float(edit.residual.max()),
            "mean_residual": float(edit.residual.mean()),
            "residual_total": float(edit.residual_total),
            "residual_per_head": edit.residual.tolist(),
        }
