"""Joint circuit-space edit: write the best factorisation of a target circuit into ``W_Q`` and ``W_K``.

For a mixing matrix ``A`` over heads the target circuit of head ``h`` is ``T_h = sum_j A[h, j] C_j``
(:mod:`qk_subspace.representations.circuit`). A head can only hold circuits of rank ``d_head``, so the
realised circuit is the best one it can hold:

* multi-head attention without rotary: ``W_Q' W_K'^T`` is the truncated SVD of ``T_h`` at rank
  ``d_head`` -- by Eckart-Young the closest rank-``d_head`` matrix in Frobenius norm;
* grouped-query attention: the query heads of a key/value group share ``W_K'``. Minimising
  ``sum_h ||T_h - W_Q'_h W_K'^T||^2`` over ``W_K'`` and every ``W_Q'_h`` is the best rank-``d_head``
  approximation of the stacked ``[T_h1; T_h2; ...]`` ``[group * d_model, d_model]`` (for fixed
  ``W_K'`` the best ``W_Q'_h`` is ``T_h W_K' (W_K'^T W_K')^{-1}``, which leaves
  ``sum_h ||T_h (I - P)||^2``), so one truncated SVD per group is the exact optimum, no iteration;
* rotary models: the same per part (:mod:`qk_subspace.model.rotary`): every rotary pair's complex circuit
  at rank 1 (complex SVD), the unrotated block at its own rank; the parts are independent.

The remaining error is that optimum, reported as the edit's ``residual`` (relative Frobenius error per
head, summed over parts). It is never larger than that of the ``W_Q``-only least-squares edit
(:mod:`qk_subspace.edits.circuit`), which is the special case ``W_K' = W_K``.

Which factors. Every ``(W_Q' G, W_K' G^{-H})`` realises the same circuit; the edit picks the one closest
to the head's current weights, so the edit is small and K = all changes nothing: with the current
factors ``(Q0, K0)`` written as the balanced SVD factors of their own circuit times the head's gauge,
``Q0 = P0 G0``, ``K0 = B0 G0^{-H}``, the new balanced factors ``(P, B)`` are rotated onto ``(P0, B0)``
by orthogonal (unitary) Procrustes, ``R = polar(P^H P0 + B^H B0)``, and ``G0`` is applied:
``W_Q' = P R G0``, ``W_K' = B R G0^{-H}``. At ``A = I``, ``P R = P0`` exactly (up to round-off), so
``W_Q' = W_Q``, ``W_K' = W_K``. The choice is gauge-covariant: in a model transformed by a gauge ``G``
the edit writes ``(W_Q' G, W_K' G^{-H})``, so the edited model computes the same function in every
gauge (on rotary models for the gauges that preserve the model). Where a head's own factors are rank
deficient (``G0`` singular) the Procrustes rotation is taken onto ``(Q0, K0)`` directly.

Biases (``b_Q``, ``b_K``) are left as they are; the circuit is the bilinear part. Cost per edit:
``n^2 d_model^2`` for the targets and one SVD of ``[group * d_model, d_model]`` per key/value head and
part; memory ``n d_model^2`` numbers per part.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model.rotary import CircuitLayout, circuit_parts, join_parts
from ..model.weights import attention_factors, key_parameter_names, kv_groups, query_parameter_name
from .circuit import check_circuit_factors
from .head_edit import HeadEdit

__all__ = ["JointCircuitEdit", "joint_circuit_factors"]

#: Relative singular values below this make a head's own factors rank deficient (no gauge ``G0``).
RANK_RTOL = 1e-10


def joint_circuit_factors(
    W_Q: torch.Tensor,
    W_K: torch.Tensor,
    A: np.ndarray | torch.Tensor,
    *,
    repeats: int = 1,
    W_Q_now: torch.Tensor | None = None,
    W_K_now: torch.Tensor | None = None,
    layout: CircuitLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factors that realise ``T_h = sum_j A[h, j] C_j`` best (pure, float64; see the module docstring).

    Args:
        W_Q, W_K: the factors the circuits are made of, ``[n_layers, n_heads, d_model, d_head]``
            (grouped-query keys repeated per query head).
        A: mixing matrix ``[n, n]`` over the ``n = n_layers * n_heads`` heads.
        repeats: query heads per key/value head (consecutive query heads share one).
        W_Q_now, W_K_now: the model's current factors (same layout; default ``W_Q``, ``W_K``): the
            gauge the new factors are written in.
        layout: the circuit's parts (default: the single ``W_Q W_K^T``).

    Returns:
        ``W_Q'`` ``[n_layers, n_heads, d_model, d_head]``, ``W_K'`` ``[n_layers, n_kv_heads, d_model, d_head]``,
        and per head ``[n_layers, n_heads]`` the squared error ``||T_h - W_Q'_h W_K'^T||^2`` and
        ``||T_h||^2`` (both summed over parts).
    """
    L, H, d_model, dh = W_Q.shape
    n_kv = H // repeats
    layout = layout or CircuitLayout.plain(dh)
    A_t = torch.as_tensor(A, dtype=torch.float64)
    W_Q_now = W_Q if W_Q_now is None else W_Q_now
    W_K_now = W_K if W_K_now is None else W_K_now
    parts = [circuit_parts(w.to(torch.float64), layout) for w in (W_Q, W_K, W_Q_now, W_K_now)]
    err = torch.zeros(L, H, dtype=torch.float64)
    ref = torch.zeros(L, H, dtype=torch.float64)
    new_q, new_k = [], []
    for Qp, Kp, Q0, K0 in zip(*parts, strict=True):
        C = (Qp @ Kp.mH).reshape(L * H, d_model * d_model)  # every head's circuit of this part
        T = (A_t.to(C.dtype) @ C).reshape(L, n_kv, repeats * d_model, d_model)  # stacked per group
        Qn, Kn = _best_factors(T, Q0.reshape(L, n_kv, repeats * d_model, -1), K0[:, ::repeats])
        R = (T - Qn @ Kn.mH).reshape(L, H, -1)
        err += (R.abs() ** 2).sum(-1)
        ref += (T.reshape(L, H, -1).abs() ** 2).sum(-1)
        new_q.append(Qn.reshape(L, H, d_model, -1))
        new_k.append(Kn)
    return join_parts(new_q, layout), join_parts(new_k, layout), err, ref


def _best_factors(T: torch.Tensor, Q0: torch.Tensor, K0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors of ``T`` ``[..., m, d]`` closest to ``(Q0 [..., m, r], K0 [..., d, r])``."""
    r = Q0.shape[-1]
    U, S, Vh = torch.linalg.svd(T, full_matrices=False)
    root = S[..., :r].sqrt().unsqueeze(-2).to(T.dtype)
    P, B = U[..., :r] * root, Vh[..., :r, :].mH * root  # balanced factors of the optimum
    # the head's own factors as balanced factors times its gauge G0 (small QR + SVD, no m x d SVD)
    Uq, Rq = torch.linalg.qr(Q0)
    Uk, Rk = torch.linalg.qr(K0)
    W, s, Zh = torch.linalg.svd(Rq @ Rk.mH)
    ok = s[..., -1] > RANK_RTOL * s[..., 0].clamp_min(torch.finfo(torch.float64).tiny)
    s_root = s.clamp_min(torch.finfo(torch.float64).tiny).sqrt().unsqueeze(-2).to(T.dtype)
    P0, B0 = (Uq @ W) * s_root, (Uk @ Zh.mH) * s_root
    G0 = (W.mH @ Rq) / s_root.mT  # S0^{-1/2} W^H Rq: Q0 = P0 G0
    eye = torch.eye(r, dtype=T.dtype).expand_as(G0)
    G0 = torch.where(ok[..., None, None], G0, eye)
    P0 = torch.where(ok[..., None, None], P0, Q0)
    B0 = torch.where(ok[..., None, None], B0, K0)
    Wm, _, Zm = torch.linalg.svd(P.mH @ P0 + B.mH @ B0)
    R = Wm @ Zm  # polar factor: argmax Re trace(R^H (P^H P0 + B^H B0)) over unitary R
    G0_inv_h = torch.linalg.inv(G0).mH
    return P @ R @ G0, B @ R @ G0_inv_h


class JointCircuitEdit(HeadEdit):
    """Active joint circuit-space edit (see the module docstring); writes ``W_Q`` and ``W_K`` of every layer.

    Args:
        model: the model; its heads must have the shape of the factors.
        W_Q, W_K: the factors the circuits were read from, ``[n_layers, n_heads, d_model, d_head]``.
        A: the mixing matrix ``[n, n]``.
        layout: the circuit's parts (rotary pairs; default the single ``W_Q W_K^T``).

    Attributes (set on entry): ``residual`` ``[n_layers, n_heads]`` (relative
    ``||T_h - W_Q'_h W_K'^T||_F / ||T_h||_F``, the Eckart-Young optimum), ``residual_total``;
    ``max_abs_error`` is ``None`` (the edit never keeps ``d_model x d_model`` circuits).
    """

    def __init__(
        self,
        model: Any,
        W_Q: torch.Tensor,
        W_K: torch.Tensor,
        A: np.ndarray,
        name: str = "circuit edit (joint)",
        layout: CircuitLayout | None = None,
    ) -> None:
        A = check_circuit_factors(model, W_Q, A)
        self.heads = torch.ones(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
        self._factors, self._A, self._layout = (W_Q, W_K), A, layout
        super().__init__(model, self._joint_plan, name=name)

    def _joint_plan(self) -> dict[str, torch.Tensor]:
        W_Q_now, W_K_now = attention_factors(self.model, ("W_Q", "W_K"))
        _, repeats = kv_groups(self.model)
        W_Q_new, W_K_new, err_sq, ref_sq = joint_circuit_factors(
            *self._factors, self._A, repeats=repeats, W_Q_now=W_Q_now, W_K_now=W_K_now, layout=self._layout
        )
        self._record_residual(err_sq, ref_sq)
        out = {}
        for layer, block in enumerate(self.model.blocks):
            p = block.attn.W_Q
            out[query_parameter_name(layer)] = W_Q_new[layer].to(device=p.device, dtype=p.dtype)
            out[key_parameter_names(self.model, layer)[0]] = W_K_new[layer].to(device=p.device, dtype=p.dtype)
        return out
