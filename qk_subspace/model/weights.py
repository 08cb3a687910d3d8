"""Where a model keeps its attention weights: names, grouped-query layout, factor stacks, slots.

Every weight is named in TransformerLens layout, per layer ``l``:

* ``blocks.{l}.attn.W_Q`` ``[n_heads, d_model, d_head]`` (and ``b_Q`` ``[n_heads, d_head]``);
* the key and value weights, one per key/value head (:func:`key_parameter_names`,
  :func:`value_parameter_name`): ``[n_kv_heads, d_model, d_head]``; query head ``h`` uses key/value
  head ``h // repeats`` (:func:`kv_groups`);
* ``W_O`` ``[n_heads, d_head, d_model]``.

A ``HookedTransformer`` stores these as parameters (grouped-query keys/values as ``_W_K``/``_W_V``); a
``TransformerBridge`` stores the Hugging Face parameters and shows these as views of them. Every
module that reads or plans writes of attention weights asks this one, which asks the model's
backend (:mod:`qk_subspace.model.backends`); the one writer,
:class:`~qk_subspace.edits.parameter_edit.ParameterEdit`, writes through :func:`weight_slots`.
"""

from __future__ import annotations

from typing import Any

import torch

from . import backends
from .slots import WeightSlot

__all__ = [
    "WeightSlot",
    "attention_factors",
    "attention_weight",
    "flatten_heads",
    "key_parameter_names",
    "kv_groups",
    "kv_weight",
    "model_device",
    "named_weights",
    "query_parameter_name",
    "value_parameter_name",
    "weight_slots",
]


def model_device(model: Any) -> torch.device:
    """The device of the model's unembedding (where tokens and targets go)."""
    return model.W_U.device


def kv_groups(model: Any) -> tuple[int, int]:
    """``(n_kv_heads, repeats)``: query head ``h`` uses key/value head ``h // repeats``."""
    cfg = model.cfg
    n_kv = int(cfg.n_key_value_heads or cfg.n_heads)
    return n_kv, int(cfg.n_heads) // n_kv


def weight_slots(model: Any) -> dict[str, WeightSlot]:
    """Every writable weight by name: the parameters under their own names, and (on a bridge) the
    attention weights under their TransformerLens names as views of the parameters."""
    return backends.of(model).weight_slots(model)


def named_weights(model: Any) -> dict[str, torch.Tensor]:
    """``{name: live weight}`` for every name of :func:`weight_slots` (views: do not write to them)."""
    return {name: slot.value() for name, slot in weight_slots(model).items()}


def query_parameter_name(layer: int) -> str:
    """Name of layer ``layer``'s query weight ``[n_heads, d_model, d_head]``."""
    return f"blocks.{layer}.attn.W_Q"


def key_parameter_names(model: Any, layer: int) -> tuple[str, str]:
    """Names of the key weight ``[n_kv_heads, d_model, d_head]`` and bias ``[n_kv_heads, d_head]``."""
    backend = backends.of(model)
    return backend.kv_parameter_name(model, layer, "W_K"), backend.kv_parameter_name(model, layer, "b_K")


def value_parameter_name(model: Any, layer: int) -> str:
    """Name of the value weight ``[n_kv_heads, d_model, d_head]``."""
    return backends.of(model).kv_parameter_name(model, layer, "W_V")


def attention_weight(model: Any, layer: int, name: str) -> torch.Tensor:
    """Layer ``layer``'s ``W_Q``/``W_K``/``W_V``/``W_O``/``b_*`` with one entry per *query* head (grouped-query
    keys/values repeated; a bias the model does not have is zeros). Live, not detached."""
    return backends.of(model).query_head_weight(model, layer, name)


def kv_weight(model: Any, layer: int, name: str) -> torch.Tensor:
    """Layer ``layer``'s ``W_K``/``W_V``/``b_K``/``b_V`` with one entry per key/value head. Live, not detached."""
    return backends.of(model).kv_weight(model, layer, name)


def attention_factors(
    model: Any, names: tuple[str, ...] = ("W_Q", "W_K"), dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, ...]:
    """Stacked per-head attention weights, detached copies on the CPU.

    Args:
        names: ``W_Q``, ``W_K``, ``W_V`` (``[n_heads, d_model, d_head]``, grouped-query keys/values repeated
            per query head) or ``W_O`` (``[n_heads, d_head, d_model]``).

    Returns:
        One tensor per name, ``[n_layers, *shape]`` in ``dtype``.
    """
    with torch.no_grad():
        return tuple(
            torch.stack(
                [
                    attention_weight(model, layer, name).detach().to(dtype)
                    for layer in range(model.cfg.n_layers)
                ]
            ).cpu()
            for name in names
        )


def flatten_heads(W: torch.Tensor) -> torch.Tensor:
    """Per-head factors ``[..., a, b]`` as ``[n_heads, a, b]`` float64."""
    if W.ndim < 3:
        raise ValueError(f"factors must have shape [..., d_model, d_head], got {tuple(W.shape)}")
    return W.reshape(-1, *W.shape[-2:]).to(torch.float64)
