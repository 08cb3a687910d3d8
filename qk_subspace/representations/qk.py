"""The report's representation, ``W_QK = W_Q^T W_K`` per head (``"qk"``), and the same in a canonical
per-head basis (``"qk-canonical"``).

``"qk"`` is basis-dependent: a model-preserving gauge ``W_Q -> W_Q G, W_K -> W_K G^{-T}`` turns
``W_QK`` into ``G^T W_QK G^{-T}`` (:mod:`qk_subspace.edits.gauge`). ``"qk-canonical"`` first puts
every head into its canonical basis (:func:`~qk_subspace.edits.gauge.canonical_gauge`) and fits and
evaluates inside that gauge (the model's outputs are unchanged by it). Both are realised exactly by
editing ``W_Q`` (:func:`~qk_subspace.edits.qk.inject_qk`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..edits.gauge import canonical_gauge
from ..edits.qk import QKEdit
from ..model.circuits import qk_matrices
from ..model.slots import WeightSlot
from ..model.weights import attention_weight, query_parameter_name, weight_slots
from .base import HeadSpaceRepresentation
from .heads import Heads
from .mixing import Mixing

__all__ = ["CanonicalQKRepresentation", "QKRepresentation"]


class QKRepresentation(HeadSpaceRepresentation):
    """``W_Q^T W_K`` ``[d_head, d_head]`` per head, injected exactly through ``W_Q``.

    Edit options: ``method`` (``"exact"``, default, or ``"pinv"``) and ``cond_warn``
    (:func:`~qk_subspace.edits.qk.inject_qk`).
    """

    name = "qk"
    circuit = "qk"
    space = "raw"
    description = "W_Q^T W_K per head (the report's d_head x d_head QK matrices), edited through W_Q"
    supports = frozenset(
        {"clustering", "importance", "diagnostics", "groupby", "baselines", "gauges", "ambient"}
    )

    def matrices(self, model: Any) -> torch.Tensor:
        return qk_matrices(model)

    def edit(self, model: Any, heads: Heads, mixing: Mixing, **options: Any) -> QKEdit:
        target = heads.materialize(mixing).to(model.W_U.device)
        return QKEdit(model, target, heads=self._head_mask(heads, mixing), **options)

    def written_slots(self, model: Any) -> list[WeightSlot]:
        slots = weight_slots(model)
        return [slots[query_parameter_name(layer)] for layer in range(model.cfg.n_layers)]

    def gradient_factors(self, model: Any) -> list[torch.Tensor]:
        with torch.no_grad():  # one group per query head: U = W_K
            return [
                self._chain(attention_weight(model, layer, "W_K").detach().to(torch.float64))
                for layer in range(model.cfg.n_layers)
            ]


class CanonicalQKRepresentation(QKRepresentation):
    """``W_Q^T W_K`` in every head's canonical basis: fitted and evaluated inside ``canonical_gauge``."""

    name = "qk-canonical"
    space = "canonical"
    description = "W_Q^T W_K in a canonical per-head basis (inside canonical_gauge), edited through W_Q"
    supports = frozenset({"clustering", "groupby", "baselines", "gauges", "ambient"})

    def context(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        return canonical_gauge(model)
