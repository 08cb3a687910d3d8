"""Gauge-invariant PCA across heads of their full QK circuits ``C_h = W_Q W_K^T`` (d_model x d_model).

``W_QK = W_Q^T W_K`` (the report's d_head x d_head matrix) changes under a per-head change of basis
``W_Q -> W_Q G, W_K -> W_K G^{-T}`` that leaves the model unchanged (see :mod:`qk_subspace.gauge`);
``C_h`` does not. PCA across heads of the flattened ``C_h`` needs only their Gram matrix, which is
computable in d_head space without ever forming a ``d_model x d_model`` matrix:

    <C_i, C_j>_F = trace(C_i^T C_j) = trace((W_Q_i^T W_Q_j) (W_K_j^T W_K_i))

(cost ``n^2 d_model d_head^2`` multiply-adds, memory ``O(n d_head^2)`` per block). Components and
reconstructions are combinations of the heads' own circuits (:class:`~qk_subspace.grouped_pca.GramPCA`):
``C_h(K) = sum_j A[h, j] W_Q_j W_K_j^T``, kept in that factored form.

Injection (:meth:`CircuitPCA.inject`): only ``W_Q`` is edited, with the least-squares solution

    W_Q_new = C_h(K) W_K (W_K^T W_K)^{-1} = sum_j A[h, j] W_Q_j (W_K_j^T W_K) (W_K^T W_K)^{-1}

so ``W_Q_new W_K^T = C_h(K) P_h`` with ``P_h`` the projector onto ``span(W_K)``. The part of
``C_h(K)`` outside that span cannot be represented by any ``W_Q``; its relative size
``||C_h(K) (I - P_h)||_F / ||C_h(K)||_F`` is the *injection residual* (computed as
``sqrt(||C||^2 - ||C P||^2)``, so its floor is about 1e-8 in float64). At ``K = all`` (``A = I``)
``W_Q_new = W_Q`` exactly and the residual is 0. The injection uses the model's *current* ``W_K``,
so a PCA fitted in one gauge injects correctly into the model in any other gauge.

Biases: ``C_h`` is the bilinear part only; ``b_Q`` and ``b_K`` are left as they are (as the raw-space
injection leaves them).

Rotary models (e.g. stories260K): the rotations act between ``W_Q`` and the dot product, so the score
at relative offset ``p`` is ``x W_Q M_p W_K^T y``; ``C_h = W_Q W_K^T`` is the offset-0 circuit. It is
still invariant under every gauge that preserves the model (those commute with ``M_p``), so circuit-space
PCA is gauge-invariant for rotary models too, and the injected ``W_Q_new`` transforms covariantly
(``W_Q_new -> W_Q_new G``), so the injected model's perplexity is gauge-invariant as well. What the PCA
sees is the offset-0 circuit; the offset-``p`` circuits ``W_Q M_p W_K^T`` are not separately analysed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformer_lens import HookedTransformer

from .circuits import head_labels
from .grouped_pca import GramPCA, GroupBy
from .injection import ParameterEdit
from .subspace import validate_k

__all__ = ["CircuitEdit", "CircuitPCA", "circuit_factors", "circuit_gram", "materialize_circuits"]


def circuit_factors(
    model: HookedTransformer, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_Q, W_K)``, each ``[n_layers, n_heads, d_model, d_head]`` (GQA: W_K repeated per query head)."""
    with torch.no_grad():
        W_Q = torch.stack([b.attn.W_Q.detach().to(dtype) for b in model.blocks])
        W_K = torch.stack([b.attn.W_K.detach().to(dtype) for b in model.blocks])
    return W_Q.cpu(), W_K.cpu()


def _flat(W: torch.Tensor) -> torch.Tensor:
    if W.ndim < 3:
        raise ValueError(f"factors must have shape [..., d_model, d_head], got {tuple(W.shape)}")
    return W.reshape(-1, *W.shape[-2:]).to(torch.float64)


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
    A_q, A_k = _flat(W_Q), _flat(W_K)
    B_q = A_q if W_Q2 is None else _flat(W_Q2)
    B_k = A_k if W_K2 is None else _flat(W_K2)
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


class CircuitEdit(ParameterEdit):
    """Active circuit-space injection (from :meth:`CircuitPCA.inject`); edits ``W_Q`` only.

    Attributes (set on entry):
        residual: ``[n_layers, n_heads]`` float64, ``||C_h(K)(I - P_h)||_F / ||C_h(K)||_F``.
        K: components kept (``None`` for explicit components / random subspaces).
    """

    residual: torch.Tensor


class CircuitPCA(GramPCA):
    """PCA across heads of ``C_h = W_Q W_K^T`` (gauge-invariant); ``HeadPCA(space="circuit")``.

    Args:
        n_components: accepted for API parity with :class:`HeadPCA`; all components are computed.
        groupby: ``None`` (one PCA over all heads) or ``"layer"`` (one per layer).
        materialize: form the circuits explicitly (``n d_model^2`` numbers) for the Gram matrix
            instead of the d_head-space trace formula (for checking; same result).

    ``fit(model)`` or ``fit((W_Q, W_K))`` with factors ``[n_layers, n_heads, d_model, d_head]``.
    Fitted attributes: those of :class:`~qk_subspace.grouped_pca.GramPCA` (``explained_variance_``,
    ``explained_variance_ratio_``, ``cumulative_variance_``, ``coefficients_``, ...) plus
    ``W_Q_``, ``W_K_`` (the fitted factors, float64) and ``circuit_norms_`` ``[n]``.
    """

    def __init__(
        self, n_components: int | None = None, groupby: GroupBy = None, materialize: bool = False
    ) -> None:
        super().__init__(groupby=groupby)
        self.n_components = n_components
        self.materialize = materialize

    def fit(
        self, model_or_factors: HookedTransformer | tuple[torch.Tensor, torch.Tensor] | Any
    ) -> CircuitPCA:
        if isinstance(model_or_factors, HookedTransformer):
            W_Q, W_K = circuit_factors(model_or_factors)
        elif isinstance(model_or_factors, (tuple, list)) and len(model_or_factors) == 2:
            W_Q, W_K = (torch.as_tensor(w).detach().cpu().to(torch.float64) for w in model_or_factors)
        else:
            raise TypeError(
                "CircuitPCA.fit expects a HookedTransformer or a tuple (W_Q, W_K) of factors "
                f"[n_layers, n_heads, d_model, d_head]; got {type(model_or_factors).__name__}"
            )
        if W_Q.shape != W_K.shape or W_Q.ndim < 3:
            raise ValueError(
                f"W_Q and W_K must have the same shape [..., d_model, d_head], "
                f"got {tuple(W_Q.shape)} and {tuple(W_K.shape)}"
            )
        if not (torch.isfinite(W_Q).all() and torch.isfinite(W_K).all()):
            raise ValueError("W_Q / W_K contain NaN or Inf values")
        self.W_Q_, self.W_K_ = W_Q, W_K
        self.d_model_, self.d_head_ = int(W_Q.shape[-2]), int(W_Q.shape[-1])
        if self.materialize:
            C = materialize_circuits(_flat(W_Q), _flat(W_K)).reshape(-1, self.d_model_**2)
            gram = C @ C.T
        else:
            gram = circuit_gram(W_Q, W_K)
        self._fit_gram(gram, W_Q.shape[:-2])
        self.circuit_norms_ = np.sqrt(np.clip(np.diag(self.gram_), 0, None))
        return self

    # ------------------------------------------------------------ reconstruction
    def reconstruct(self, K: int | None = None, components: Sequence[int] | None = None) -> torch.Tensor:
        """Materialised ``C_h(K)``: ``[*head_shape_, d_model, d_model]`` float64 (memory ``n d_model^2``)."""
        A = torch.from_numpy(self.mixing_matrix(K=K, components=components))
        return self._combine(A)

    def _combine(self, A: torch.Tensor) -> torch.Tensor:
        C = materialize_circuits(_flat(self.W_Q_), _flat(self.W_K_))
        return torch.einsum("hj,jab->hab", A, C).reshape(*self.head_shape_, self.d_model_, self.d_model_)

    def components(self, group: int = 0) -> torch.Tensor:
        """Materialised unit-norm components ``[m, d_model, d_model]`` of one group (global: group 0)."""
        self._check_fitted()
        idx = self.groups_[group]
        lam = self.eigvals_[group]
        U = self.eigvecs_[group] / np.sqrt(np.where(lam > 0, lam, np.inf))
        W = np.zeros((len(idx), self.n_heads_))
        W[:, idx] = (U - U.mean(axis=0, keepdims=True)).T  # component_k = sum_j W[k, j] C_j
        return self._combine(torch.from_numpy(W)).reshape(len(idx), self.d_model_, self.d_model_)

    def injection_weights(
        self, A: np.ndarray | torch.Tensor, W_K: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_Q_new`` for the circuits ``C_h = sum_j A[h, j] C_j`` and the relative injection residual.

        Args:
            A: mixing matrix ``[n, n]`` (e.g. :meth:`mixing_matrix`).
            W_K: the key factors to inject against, ``[*head_shape_, d_model, d_head]`` (default: the
                fitted ones; pass the model's current ones when it is in another gauge).

        Returns:
            ``W_Q_new`` ``[*head_shape_, d_model, d_head]`` float64 and ``residual`` ``[*head_shape_]``.
        """
        self._check_fitted()
        A_t = torch.as_tensor(A, dtype=torch.float64)
        Wq, Wk = _flat(self.W_Q_), _flat(self.W_K_)
        Wk_cur = Wk if W_K is None else _flat(W_K.cpu())
        if Wk_cur.shape != Wk.shape:
            raise ValueError(f"W_K must have shape {tuple(self.W_K_.shape)}, got {tuple(W_K.shape)}")  # type: ignore[union-attr]
        n, dh = self.n_heads_, self.d_head_
        gram = torch.from_numpy(self.gram_)
        wq = Wq.permute(1, 0, 2).reshape(self.d_model_, n * dh)  # [d_model, n*dh]
        wk = Wk.permute(1, 0, 2).reshape(self.d_model_, n * dh)
        new = torch.empty_like(Wq)
        resid = torch.zeros(n, dtype=torch.float64)
        chunk = 16
        for s in range(0, n, chunk):
            hs = torch.arange(s, min(s + chunk, n))
            c = len(hs)
            Kc = Wk_cur[hs]  # [c, d_model, dh]
            # cross[j, :, h, :] = W_K_j^T W_K_h, scaled by A[h, j]; then T_h = sum_j W_Q_j cross[j, :, h, :]
            cross = (wk.T @ Kc.permute(1, 0, 2).reshape(self.d_model_, c * dh)).reshape(n, dh, c, dh)
            cross = cross * A_t[hs].T[:, None, :, None]
            T = (
                (wq @ cross.reshape(n * dh, c * dh)).reshape(self.d_model_, c, dh).permute(1, 0, 2)
            )  # C_h(K) W_K_h
            KtK = Kc.transpose(-1, -2) @ Kc
            Wn = torch.linalg.solve(KtK, T.transpose(-1, -2)).transpose(-1, -2)  # T (W_K^T W_K)^{-1}
            new[hs] = Wn
            c2 = torch.einsum("hi,ij,hj->h", A_t[hs], gram, A_t[hs])
            cp2 = torch.einsum("hmd,hme,hed->h", Wn, Wn, KtK)  # trace(Wn^T Wn KtK)
            ratio = torch.clamp(c2 - cp2, min=0.0) / torch.where(c2 > 0, c2, torch.ones_like(c2))
            resid[hs] = torch.where(c2 > 0, ratio.sqrt(), torch.zeros_like(c2))
        return new.reshape(self.W_Q_.shape), resid.reshape(self.head_shape_)

    def inject(
        self,
        model: HookedTransformer,
        K: int | None = None,
        components: Sequence[int] | None = None,
        A: np.ndarray | None = None,
    ) -> CircuitEdit:
        """Edit ``W_Q`` in place so that every head realises ``C_h(K)`` (least squares); a context manager.

        Give one of ``K``, ``components`` or an explicit mixing matrix ``A`` (e.g. a random-subspace
        baseline). The plan is computed on entry against the model's current ``W_K``.
        """
        self._check_fitted()
        if sum(x is not None for x in (K, components, A)) != 1:
            raise ValueError("inject: give exactly one of K, components or A")
        cfg = model.cfg
        if (cfg.n_layers, cfg.n_heads) != tuple(self.head_shape_) or cfg.d_model != self.d_model_:
            raise ValueError(
                f"inject: the PCA was fitted on heads {self.head_shape_} with d_model={self.d_model_}, "
                f"the model has ({cfg.n_layers}, {cfg.n_heads}) and d_model={cfg.d_model}"
            )
        if K is not None:
            validate_k(K, self.n_components_)
        mix = self.mixing_matrix(K=K, components=components) if A is None else np.asarray(A, dtype=np.float64)
        if mix.shape != (self.n_heads_, self.n_heads_):
            raise ValueError(f"A must have shape [{self.n_heads_}, {self.n_heads_}], got {mix.shape}")

        def plan() -> dict[str, torch.Tensor]:
            _, W_K_cur = circuit_factors(model)
            W_new, resid = self.injection_weights(mix, W_K=W_K_cur)
            edit.residual = resid
            out = {}
            for layer, block in enumerate(model.blocks):
                p = block.attn.W_Q
                out[f"blocks.{layer}.attn.W_Q"] = W_new[layer].to(device=p.device, dtype=p.dtype)
            return out

        edit = CircuitEdit(model, plan, name=f"circuit_inject(K={K})")
        edit.K = K  # type: ignore[attr-defined]
        return edit

    def residual_table(self, residual: torch.Tensor) -> dict[str, float]:
        """``{head label: residual}`` for reporting."""
        labels = (
            head_labels(*self.head_shape_)
            if len(self.head_shape_) == 2
            else [str(i) for i in range(self.n_heads_)]
        )
        return dict(zip(labels, residual.flatten().tolist(), strict=False))

    def __repr__(self) -> str:
        if hasattr(self, "eigvals_"):
            return (
                f"CircuitPCA(groupby={self.groupby!r}, n_heads={self.n_heads_}, d_model={self.d_model_}, "
                f"nonzero={self.n_nonzero_components_})"
            )
        return f"CircuitPCA(groupby={self.groupby!r})"
