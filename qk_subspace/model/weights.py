"""Where a model keeps its attention weights: parameter names, grouped-query layout, factor stacks.

TransformerLens' ``HookedTransformer`` stores, per layer ``l``:

* ``blocks.{l}.attn.W_Q`` ``[n_heads, d_model, d_head]`` (and ``b_Q`` ``[n_heads, d_head]``);
* keys and values ``W_K``/``W_V`` of the same shape, or, for grouped-query attention, the parameters
  ``_W_K``/``_W_V`` ``[n_kv_heads, d_model, d_head]`` (``_b_K``/``_b_V``), which ``attn.W_K``/``attn.W_V``
  repeat to one per query head (query head ``h`` uses key/value head ``h // repeats``);
* ``W_O`` ``[n_heads, d_head, d_model]``.

Every module that reads or plans writes of attention weights asks this one for names and layout.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "attention_factors",
    "flatten_heads",
    "key_parameter_names",
    "kv_groups",
    "model_device",
    "query_parameter_name",
    "value_parameter_name",
]


def model_device(model: Any) -> torch.device:
    """The device of the model's unembedding (where tokens and targets go)."""
    return model.W_U.device


def kv_groups(model: Any) -> tuple[int, int]:
    """``(n_kv_heads, repeats)``: query head ``h`` uses key/value head ``h // repeats``."""
    cfg = model.cfg
    n_kv = int(cfg.n_key_value_heads or cfg.n_heads)
    return n_kv, int(cfg.n_heads) // n_kv


def query_parameter_name(layer: int) -> str:
    """Name of layer ``layer``'s query weight ``[n_heads, d_model, d_head]``."""
    return f"blocks.{layer}.attn.W_Q"


def key_parameter_names(model: Any, layer: int) -> tuple[str, str]:
    """Names of the key weight and bias parameters: ``_W_K``/``_b_K`` (grouped-query) or ``W_K``/``b_K``."""
    attn = model.blocks[layer].attn
    prefix = f"blocks.{layer}.attn."
    if hasattr(attn, "_W_K"):
        return prefix + "_W_K", prefix + "_b_K"
    return prefix + "W_K", prefix + "b_K"


def value_parameter_name(model: Any, layer: int) -> str:
    """Name of the value weight parameter: ``attn._W_V`` (grouped-query) or ``attn.W_V``."""
    attn = model.blocks[layer].attn
    return f"blocks.{layer}.attn._W_V" if hasattr(attn, "_W_V") else f"blocks.{layer}.attn.W_V"


def attention_factors(
    model: Any, names: tuple[str, ...] = ("W_Q", "W_K"), dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, ...]:
    """Stacked per-head attention weights, detached copies on the CPU.

    Args:
        names: attributes of ``blocks[l].attn`` (``W_Q``, ``W_K``, ``W_V``: ``[n_heads, d_model, d_head]``
            with grouped-query keys/values repeated per query head; ``W_O``: ``[n_heads, d_head, d_model]``).

    Returns:
        One tensor per name, ``[n_layers, *shape]`` in ``dtype``.
    """
    with torch.no_grad():
        return tuple(
            torch.stack([getattr(b.attn, name).detach().to(dtype) for b in model.blocks]).cpu()
            for name in names
        )


def flatten_heads(W: torch.Tensor) -> torch.Tensor:
    """Per-head factors ``[..., a, b]`` as ``[n_heads, a, b]`` float64."""
    if W.ndim < 3:
        raise ValueError(f"factors must have shape [..., d_model, d_head], got {tuple(W.shape)}")
    return W.reshape(-1, *W.shape[-2:]).to(torch.float64)
