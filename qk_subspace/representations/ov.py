"""Head-space OV circuits ``W_OV = W_V^T W_O^T`` per head (``"ov"``), realised exactly through ``W_V``.

See :mod:`qk_subspace.edits.ov` for the form, the injection and grouped-query value heads.
"""

from __future__ import annotations

from typing import Any

import torch

from ..edits.ov import OVEdit
from ..model.circuits import ov_matrices
from ..model.slots import WeightSlot
from ..model.weights import kv_groups, value_parameter_name, weight_slots
from .base import HeadSpaceRepresentation
from .heads import Heads
from .mixing import Mixing

__all__ = ["OVRepresentation"]


class OVRepresentation(HeadSpaceRepresentation):
    """``W_V^T W_O^T`` ``[d_head, d_head]`` per head, injected exactly through ``W_V`` (edit option ``cond_warn``)."""

    name = "ov"
    circuit = "ov"
    space = "raw"
    description = "W_V^T W_O^T per head (head-space OV circuits), edited through W_V"
    supports = frozenset({"clustering", "importance", "diagnostics", "ambient"})

    def matrices(self, model: Any) -> torch.Tensor:
        return ov_matrices(model)

    def edit(self, model: Any, heads: Heads, mixing: Mixing, **options: Any) -> OVEdit:
        target = heads.materialize(mixing).to(model.W_U.device)
        return OVEdit(model, target, heads=self._head_mask(heads, mixing), **options)

    def written_slots(self, model: Any) -> list[WeightSlot]:
        slots = weight_slots(model)
        return [slots[value_parameter_name(model, layer)] for layer in range(model.cfg.n_layers)]

    def gradient_factors(self, model: Any) -> list[torch.Tensor]:
        n_v, r = kv_groups(model)
        out = []
        with torch.no_grad():
            for block in model.blocks:
                U = block.attn.W_O.detach().to(torch.float64).transpose(-1, -2)  # [n_heads, d_model, d_head]
                d_model, d_head = U.shape[-2:]
                Ug = U.reshape(n_v, r, d_model, d_head).permute(0, 2, 1, 3).reshape(n_v, d_model, r * d_head)
                out.append(self._chain(Ug))
        return out
