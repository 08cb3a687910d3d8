"""Circuit-space edit: realise a mixing of the heads' full QK circuits ``C_h = W_Q W_K^T`` through ``W_Q``.

For a mixing matrix ``A`` over heads the target circuit of head ``h`` is
``C_h(A) = sum_j A[h, j] W_Q_j W_K_j^T`` (``d_model x d_model``, never materialised). Only ``W_Q`` is
edited, with the least-squares solution

    W_Q_new = C_h(A) W_K (W_K^T W_K)^{-1} = sum_j A[h, j] W_Q_j (W_K_j^T W_K) (W_K^T W_K)^{-1}

so ``W_Q_new W_K^T = C_h(A) P_h`` with ``P_h`` the projector onto ``span(W_K)``. The part of
``C_h(A)`` outside that span cannot be represented by any ``W_Q``; its relative size
``||C_h(A) (I - P_h)||_F / ||C_h(A)||_F`` is the edit's residual (computed as
``sqrt(||C||^2 - ||C P||^2)``, so its floor is about 1e-8 in float64). At ``A = I``
``W_Q_new = W_Q`` up to round-off and the residual is 0. The edit uses the model's *current*
``W_K``, so circuits fitted in one gauge are realised correctly in the model in any other gauge.

Rotary models: the same, part by part (every rotary pair's complex circuit ``w_Q w_K^H`` against its
complex key column, then the unrotated block; :mod:`qk_subspace.model.rotary`), with the residual
summed over the parts.

Biases: ``C_h`` is the bilinear part only; ``b_Q`` and ``b_K`` are left as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model.rotary import CircuitLayout, circuit_parts, join_parts
from ..model.weights import attention_factors, flatten_heads, query_parameter_name
from .head_edit import HeadEdit

__all__ = ["CircuitEdit", "check_circuit_factors", "circuit_injection_weights"]


def circuit_injection_weights(
    W_Q: torch.Tensor,
    W_K: torch.Tensor,
    gram: np.ndarray | torch.Tensor,
    A: np.ndarray | torch.Tensor,
    W_K_target: torch.Tensor | None = None,
    layout: CircuitLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_Q_new`` realising ``C_h = sum_j A[h, j] C_j`` against ``W_K_target`` (pure, float64).

    Args:
        W_Q, W_K: the factors the circuits are made of, ``[*head_shape, d_model, d_head]``.
        gram: ``[n, n]`` Gram matrix ``<C_i, C_j>_F`` of those circuits (summed over the parts).
        A: mixing matrix ``[n, n]``.
        W_K_target: the key factors to realise against (default ``W_K``; the model's current ones when
            it is in another gauge), same shape.
        layout: the circuit's parts (default: the single ``W_Q W_K^T``).

    Returns:
        ``W_Q_new`` ``[*head_shape, d_model, d_head]`` and ``(||C - C P||^2, ||C||^2)``, each
        ``[*head_shape]``, the squared residual and the squared target norm per head.
    """
    A_t = torch.as_tensor(A, dtype=torch.float64)
    Wq, Wk = flatten_heads(W_Q), flatten_heads(W_K)
    Wk_cur = Wk if W_K_target is None else flatten_heads(W_K_target.cpu())
    if Wk_cur.shape != Wk.shape:
        raise ValueError(
            f"W_K_target must have the shape of W_K, {tuple(W_K.shape)}; got {tuple(Wk_cur.shape)} heads"
        )
    n, _, dh = Wq.shape
    layout = layout or CircuitLayout.plain(dh)
    G = torch.as_tensor(gram, dtype=torch.float64)
    new_parts, cp2 = [], torch.zeros(n, dtype=torch.float64)
    for Qp, Kp, Kc in zip(*(circuit_parts(w, layout) for w in (Wq, Wk, Wk_cur)), strict=True):
        part, part_cp2 = _least_squares_part(Qp, Kp, Kc, A_t)
        new_parts.append(part)
        cp2 += part_cp2
    c2 = torch.einsum("hi,ij,hj->h", A_t, G, A_t)
    err_sq = torch.clamp(c2 - cp2, min=0.0)
    head_shape = W_Q.shape[:-2]
    new = join_parts(new_parts, layout)
    return new.reshape(W_Q.shape), torch.stack([err_sq.reshape(head_shape), c2.reshape(head_shape)])


def _least_squares_part(
    Wq: torch.Tensor, Wk: torch.Tensor, Wk_cur: torch.Tensor, A: torch.Tensor, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part: ``Q_new[h] = C_h(A) K_h (K_h^H K_h)^{-1}`` and ``||C_h(A) P_h||^2`` (real or complex factors
    ``[n, d_model, r]``)."""
    n, d_model, dh = Wq.shape
    wq = Wq.permute(1, 0, 2).reshape(d_model, n * dh)  # [d_model, n*dh]
    wk = Wk.permute(1, 0, 2).reshape(d_model, n * dh)
    new = torch.empty_like(Wq)
    cp2 = torch.zeros(n, dtype=torch.float64)
    for s in range(0, n, chunk):
        hs = torch.arange(s, min(s + chunk, n))
        c = len(hs)
        Kc = Wk_cur[hs]  # [c, d_model, dh]
        # cross[j, :, h, :] = W_K_j^H W_K_h, scaled by A[h, j]; then T_h = sum_j W_Q_j cross[j, :, h, :]
        cross = (wk.conj().T @ Kc.permute(1, 0, 2).reshape(d_model, c * dh)).reshape(n, dh, c, dh)
        cross = cross * A[hs].T[:, None, :, None].to(cross.dtype)
        T = (wq @ cross.reshape(n * dh, c * dh)).reshape(d_model, c, dh).permute(1, 0, 2)  # C_h(A) W_K_h
        KtK = Kc.mH @ Kc
        Wn = torch.linalg.solve(KtK, T.mH).mH  # T (W_K^H W_K)^{-1}
        new[hs] = Wn
        cp2[hs] = torch.einsum("hmd,hde,hme->h", Wn, KtK, Wn.conj()).real  # ||C P||^2
    return new, cp2


class CircuitEdit(HeadEdit):
    """Active circuit-space edit through ``W_Q`` (see the module docstring); writes ``W_Q`` of every head.

    Args:
        model: the model; its heads must have the shape of the factors.
        W_Q, W_K: the factors the circuits were read from, ``[n_layers, n_heads, d_model, d_head]``.
        gram: their Gram matrix ``[n, n]``.
        A: the mixing matrix ``[n, n]``.
        layout: the circuit's parts (rotary pairs; default the single ``W_Q W_K^T``).

    Attributes (set on entry): ``residual`` (relative ``||C_h(A)(I - P_h)||_F / ||C_h(A)||_F``),
    ``residual_total``; ``max_abs_error`` is ``None`` (the circuits are never materialised).
    """

    def __init__(
        self,
        model: Any,
        W_Q: torch.Tensor,
        W_K: torch.Tensor,
        gram: Any,
        A: np.ndarray,
        name: str = "circuit edit",
        layout: CircuitLayout | None = None,
    ) -> None:
        A = check_circuit_factors(model, W_Q, A)
        self.heads = torch.ones(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
        self._factors, self._gram, self._A, self._layout = (W_Q, W_K), gram, A, layout
        super().__init__(model, self._circuit_plan, name=name)

    def _circuit_plan(self) -> dict[str, torch.Tensor]:
        (W_K_now,) = attention_factors(self.model, ("W_K",))
        W_new, (err_sq, ref_sq) = circuit_injection_weights(
            *self._factors, self._gram, self._A, W_K_now, layout=self._layout
        )
        self._record_residual(err_sq, ref_sq)
        out = {}
        for layer, block in enumerate(self.model.blocks):
            p = block.attn.W_Q
            out[query_parameter_name(layer)] = W_new[layer].to(device=p.device, dtype=p.dtype)
        return out


def check_circuit_factors(model: Any, W_Q: torch.Tensor, A: Any) -> np.ndarray:
    """``ValueError`` unless factors ``[n_layers, n_heads, d_model, d_head]`` and a mixing matrix ``A``
    ``[n, n]`` fit the model's heads; returns ``A`` as float64."""
    cfg = model.cfg
    if tuple(W_Q.shape[:-2]) != (cfg.n_layers, cfg.n_heads) or W_Q.shape[-2] != cfg.d_model:
        raise ValueError(
            f"the circuits were read from heads {tuple(W_Q.shape[:-2])} with d_model={W_Q.shape[-2]}; "
            f"the model has ({cfg.n_layers}, {cfg.n_heads}) and d_model={cfg.d_model}"
        )
    n = cfg.n_layers * cfg.n_heads
    A = np.asarray(A, dtype=np.float64)
    if A.shape != (n, n):
        raise ValueError(f"A must have shape [{n}, {n}], got {A.shape}")
    return A
