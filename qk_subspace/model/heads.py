"""Head indexing: flat and ``(layer, head)`` indices, ``L{layer}H{head}`` labels, head selections.

Heads are numbered layer-major: head ``h`` of layer ``l`` is flat index ``l * n_heads + h``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "head_index",
    "head_labels",
    "flat_to_layer_head",
    "layer_head_to_flat",
    "parse_heads",
]


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
