"""The head-space circuits of a model, read from TransformerLens' factored circuits.

Every head h of layer l has query and key weights ``W_Q[l, h]`` and ``W_K[l, h]`` of shape
``[d_model, d_head]``. Its bilinear attention-score form in head space is

    W_QK[l, h] = W_Q[l, h]^T @ W_K[l, h]            # [d_head, d_head]

TransformerLens exposes ``model.QK = FactoredMatrix(W_Q, W_K^T)`` (the ``d_model x d_model``
circuit ``W_Q W_K^T`` in factored form); its "BA" product ``W_K^T W_Q`` is ``W_QK`` transposed,
so ``W_QK = model.QK.BA.transpose(-1, -2)``. For grouped-query models ``attn.W_K`` repeats the
key/value heads, so every query head gets the key matrix of its key/value group.

The OV circuit (``model.OV = FactoredMatrix(W_V, W_O)``) is read the same way, with the reading
factor first: ``W_OV[l, h] = W_V^T W_O^T = model.OV.BA^T`` (see :mod:`qk_subspace.edits.ov`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import FactoredMatrix

__all__ = ["ov_matrices", "qk_matrices"]


def _head_space(circuit: FactoredMatrix, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.no_grad():
        if dtype is not None:
            circuit = FactoredMatrix(circuit.A.to(dtype), circuit.B.to(dtype))
        return circuit.BA.transpose(-1, -2).detach().clone()


def qk_matrices(model: Any, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Return every head's QK matrix ``W_Q^T W_K``.

    Args:
        model: a HookedTransformer or TransformerBridge (multi-head or grouped-query attention).
        dtype: dtype of the result; the product is formed in this dtype. ``None`` keeps the
            model's dtype. Default float64, so downstream PCA and injection are exact.

    Returns:
        Tensor ``[n_layers, n_heads, d_head, d_head]`` with ``W[l, h] = W_Q[l, h]^T @ W_K[l, h]``,
        detached from autograd, on the model's device.
    """
    return _head_space(model.QK, dtype)


def ov_matrices(model: Any, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Every head's head-space OV matrix ``W_V^T W_O^T = model.OV.BA^T``.

    Args:
        model: a HookedTransformer or TransformerBridge (for grouped-query models ``attn.W_V`` repeats the shared
            value weights, so every query head gets its group's ``W_V``).
        dtype: dtype in which the product is formed (default float64); ``None`` keeps the model's.

    Returns:
        ``[n_layers, n_heads, d_head, d_head]``, detached, on the model's device.
    """
    return _head_space(model.OV, dtype)
