"""QK circuits of a HookedTransformer, read from TransformerLens' factored circuit.

Every head h of layer l has query and key weights ``W_Q[l, h]`` and ``W_K[l, h]`` of shape
``[d_model, d_head]``. Its bilinear attention-score form in head space is

    W_QK[l, h] = W_Q[l, h]^T @ W_K[l, h]            # [d_head, d_head]

TransformerLens exposes ``model.QK = FactoredMatrix(W_Q, W_K^T)`` (the ``d_model x d_model``
circuit ``W_Q W_K^T`` in factored form); its "BA" product ``W_K^T W_Q`` is ``W_QK`` transposed,
so ``W_QK = model.QK.BA.transpose(-1, -2)``. For grouped-query models ``attn.W_K`` repeats the
key/value heads, so every query head gets the key matrix of its key/value group.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from transformer_lens import FactoredMatrix, HookedTransformer

__all__ = [
    "qk_matrices",
    "head_index",
    "head_labels",
    "flat_to_layer_head",
    "layer_head_to_flat",
    "parse_heads",
]


def qk_matrices(model: HookedTransformer, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Return every head's QK matrix ``W_Q^T W_K``.

    Args:
        model: any HookedTransformer (multi-head or grouped-query attention).
        dtype: dtype of the result; the product is formed in this dtype. ``None`` keeps the
            model's dtype. Default float64, so downstream PCA and injection are exact.

    Returns:
        Tensor ``[n_layers, n_heads, d_head, d_head]`` with ``W[l, h] = W_Q[l, h]^T @ W_K[l, h]``,
        detached from autograd, on the model's device.
    """
    with torch.no_grad():
        qk: FactoredMatrix = model.QK
        if dtype is not None:
            qk = FactoredMatrix(qk.A.to(dtype), qk.B.to(dtype))
        return qk.BA.transpose(-1, -2).detach().clone()


def flat_to_layer_head(index: int, n_heads: int) -> tuple[int, int]:
    """Map a flat head index ``layer * n_heads + head`` to ``(layer, head)``."""
    return divmod(int(index), n_heads)


def layer_head_to_flat(layer: int, head: int, n_heads: int) -> int:
    """Map ``(layer, head)`` to the flat index ``layer * n_heads + head``."""
    return int(layer) * n_heads + int(head)


def head_index(n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """All ``(layer, head)`` pairs in flat order (layer-major)."""
    return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    """Labels ``L{layer}H{head}`` for every head in flat order, e.g. ``L3H7``."""
    return [f"L{layer}H{head}" for layer, head in head_index(n_layers, n_heads)]


def _is_integral(x: object) -> bool:
    """An int-like value: Python/numpy integers or integral floats (not bool, NaN or Inf)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    return math.isfinite(float(x)) and int(float(x)) == x


def parse_heads(
    heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None,
    n_layers: int,
    n_heads: int,
) -> torch.Tensor:
    """Turn a head selection into a boolean mask ``[n_layers, n_heads]``.

    Accepts ``None`` (all heads), a boolean mask of that shape, flat indices, or
    ``(layer, head)`` pairs. Raises ``ValueError`` naming any head out of range.
    """
    if heads is None:
        return torch.ones(n_layers, n_heads, dtype=torch.bool)
    if isinstance(heads, torch.Tensor) and heads.dtype == torch.bool:
        if tuple(heads.shape) != (n_layers, n_heads):
            raise ValueError(
                f"heads: a boolean mask must have shape ({n_layers}, {n_heads}), got {tuple(heads.shape)}"
            )
        return heads.detach().cpu().clone()
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    items: Sequence = heads.tolist() if isinstance(heads, torch.Tensor) else list(heads)
    for item in items:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ValueError(f"heads: expected (layer, head) pairs, got {item!r}")
            if not all(_is_integral(x) for x in item):
                raise ValueError(
                    f"heads: (layer, head) pairs must hold integers (layers 0..{n_layers - 1}, "
                    f"heads 0..{n_heads - 1}), got {item!r}"
                )
            layer, head = int(item[0]), int(item[1])
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ValueError(
                    f"heads: (layer, head)={item!r} is out of range; allowed layers "
                    f"0..{n_layers - 1}, heads 0..{n_heads - 1}"
                )
        else:
            if not _is_integral(item):
                raise ValueError(
                    f"heads: flat head indices must be integers in 0..{n_layers * n_heads - 1}, got {item!r}"
                )
            flat = int(item)
            if not 0 <= flat < n_layers * n_heads:
                raise ValueError(
                    f"heads: flat index {flat} is out of range; allowed 0..{n_layers * n_heads - 1}"
                )
            layer, head = flat_to_layer_head(flat, n_heads)
        mask[layer, head] = True
    return mask
