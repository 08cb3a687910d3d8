"""The head-representation protocol: what a representation of the heads' circuits must provide.

A :class:`Representation` turns a model into :class:`~qk_subspace.representations.heads.Heads`
(the data a :class:`~qk_subspace.decomposition.pca.HeadPCA` is fitted on) and turns a reconstruction
(a :class:`~qk_subspace.representations.mixing.Mixing` of those heads) into an edit of the model
(a :class:`~qk_subspace.edits.head_edit.HeadEdit`, entered as a context manager). Everything else
-- sweeps, clustering, null baselines, the experiment runner -- only talks to this protocol.

To add a representation: subclass :class:`Representation` in one module, set its class
attributes, implement :meth:`~Representation.heads` and :meth:`~Representation.edit`, and
:func:`qk_subspace.representations.register` an instance.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch

from ..edits.head_edit import HeadEdit
from ..model.slots import WeightSlot
from .heads import DenseHeads, Heads
from .mixing import Mixing

__all__ = ["OPTIONS", "HeadSpaceRepresentation", "Representation"]

#: Experiment options a representation may support (what ``Representation.supports`` lists):
#: ``clustering`` (6C), ``importance`` (components ranked by function), ``diagnostics`` (attention
#: patterns per K), ``groupby`` (per-layer PCA), ``baselines`` (null baselines), ``gauges`` (gauge study),
#: ``ambient`` (random subspaces of the whole feature space).
OPTIONS = ("clustering", "importance", "diagnostics", "groupby", "baselines", "gauges", "ambient")


class Representation:
    """A representation of every head's circuit (subclass it; see the module docstring).

    Class attributes:
        name: the registry name (``"qk"``, ``"qk-canonical"``, ``"qk-circuit"``, ``"ov"``).
        circuit: the circuit it describes, ``"qk"`` or ``"ov"``.
        space: how, ``"raw"`` (head-space matrices as the model stores them), ``"canonical"`` (the same
            in a canonical per-head basis) or ``"circuit"`` (the basis-free ``d_model x d_model`` form).
        description: one line for help texts and reports.
        supports: the :data:`OPTIONS` it can run.
        gauge_invariant: whether its heads, and so its PCA, are unchanged by model-preserving gauges.
    """

    name: ClassVar[str]
    circuit: ClassVar[str]
    space: ClassVar[str]
    description: ClassVar[str]
    supports: ClassVar[frozenset[str]]
    gauge_invariant: ClassVar[bool] = False

    def heads(self, model: Any) -> Heads:
        """The model's heads in this representation (call inside :meth:`context`)."""
        raise NotImplementedError

    def context(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """The weight state fitting and evaluating need (e.g. a canonical gauge); default: the model as is."""
        return contextlib.nullcontext()

    def edit(self, model: Any, heads: Heads, mixing: Mixing, **options: Any) -> HeadEdit:
        """An edit that realises the reconstruction ``mixing`` of ``heads`` in ``model`` (enter it with ``with``)."""
        raise NotImplementedError

    def residual_columns(self, edit: HeadEdit) -> dict[str, float]:
        """The residual columns of a sweep row for an edit that was entered.

        Head-space representations report ``max_residual``, the largest entrywise
        ``|realised - target|``; see :mod:`~qk_subspace.edits.head_edit`.
        """
        assert edit.max_abs_error is not None
        return {"max_residual": float(edit.max_abs_error.max())}

    def supported(self, option: str) -> bool:
        """Whether this representation supports the experiment option ``option`` (one of :data:`OPTIONS`)."""
        if option not in OPTIONS:
            raise ValueError(f"unknown option {option!r}; options are {list(OPTIONS)}")
        return option in self.supports

    @staticmethod
    def _head_mask(heads: Heads, mixing: Mixing) -> torch.Tensor:
        """The heads a mixing changes, as a bool mask ``[*head_shape]``."""
        return torch.as_tensor(mixing.edited).reshape(heads.head_shape)

    def __repr__(self) -> str:
        return f"<representation {self.name!r}: {self.description}>"


class HeadSpaceRepresentation(Representation):
    """A representation by explicit ``d_head x d_head`` matrices per head, edited through one weight.

    Subclasses give :meth:`matrices` (``[n_layers, n_heads, d, d]``), :meth:`edit`, and for the
    gradient of the loss with respect to the head matrices (``importance`` by gradient) the weight
    each layer's edit writes (:meth:`written_slots`) and the factors of the chain rule
    (:meth:`gradient_factors`).
    """

    def matrices(self, model: Any) -> torch.Tensor:
        """``[n_layers, n_heads, d_head, d_head]`` float64 head matrices of the model."""
        raise NotImplementedError

    def heads(self, model: Any) -> Heads:
        return DenseHeads(self.matrices(model), representation=self.name)

    def written_slots(self, model: Any) -> list[WeightSlot]:
        """The weight each layer's edit writes (``W_Q``, ``W_V``, ...), in layer order, with the
        parameter that stores it (autograd runs on the parameter; the slot gives its gradient the
        weight's layout)."""
        raise NotImplementedError

    def gradient_factors(self, model: Any) -> list[torch.Tensor]:
        """Per layer ``G_g^{-1} U_g^T`` ``[n_groups, r*d_head, d_model]``: the edit writes
        ``dW = U_g G_g^{-1} dR_g^T``, so ``(dL/dR_g)^T = G_g^{-1} U_g^T dL/dW`` (see
        :mod:`qk_subspace.evaluation.importance`)."""
        raise NotImplementedError

    @staticmethod
    def _chain(Ug: torch.Tensor) -> torch.Tensor:
        """``G^{-1} U^T`` for stacked ``U`` ``[n_groups, d_model, r*d_head]`` (float64, by ``solve``)."""
        G = Ug.transpose(-1, -2) @ Ug
        return torch.linalg.solve(G, Ug.transpose(-1, -2))
