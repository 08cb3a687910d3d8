"""A weight in TransformerLens layout and the real parameter that stores it: :class:`WeightSlot`.

A ``HookedTransformer`` stores its attention weights in TransformerLens layout (``W_Q``
``[n_heads, d_model, d_head]`` is a parameter). A ``TransformerBridge`` stores the Hugging Face
module's own ``q_proj.weight`` ``[n_heads * d_head, d_model]`` and shows ``W_Q`` as a *view* of it.
A slot names the weight, holds the parameter and the view's geometry, so that the one weight
writer (:class:`~qk_subspace.edits.parameter_edit.ParameterEdit`) can write a TransformerLens-layout
value into the real parameter and restore it bit for bit, and so that the same view can be taken
of any tensor laid out like the parameter (its gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["WeightSlot"]


@dataclass(frozen=True)
class WeightSlot:
    """One weight, as a view of one parameter's storage.

    Attributes:
        name: the weight's name (``"blocks.0.attn.W_Q"``, or a parameter's own name).
        parameter: the ``nn.Parameter`` that stores it.
        size, stride: the view's shape and strides (elements).
        offset: the view's storage offset relative to the parameter's.
    """

    name: str
    parameter: nn.Parameter
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    _index: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def identity(cls, name: str, parameter: nn.Parameter) -> WeightSlot:
        """The parameter itself."""
        return cls(name, parameter, tuple(parameter.shape), tuple(parameter.stride()), 0)

    @classmethod
    def of_view(cls, name: str, parameter: nn.Parameter, view: torch.Tensor) -> WeightSlot:
        """The slot of ``view``, which must be a view of ``parameter``'s storage (a reshape/transpose)."""
        if view.untyped_storage().data_ptr() != parameter.untyped_storage().data_ptr():
            raise ValueError(
                f"{name}: the weight is not a view of its parameter (a copy cannot be written back)"
            )
        return cls(
            name,
            parameter,
            tuple(view.shape),
            tuple(view.stride()),
            int(view.storage_offset() - parameter.storage_offset()),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    def value(self) -> torch.Tensor:
        """The live weight (a view of the parameter: writes to it change the model)."""
        return self.of(self.parameter)

    @property
    def is_identity(self) -> bool:
        p = self.parameter
        return self.offset == 0 and self.size == tuple(p.shape) and self.stride == tuple(p.stride())

    def of(self, like: torch.Tensor) -> torch.Tensor:
        """The same view of ``like``, a tensor shaped like the parameter (its gradient): a view of ``like``
        when its strides are the parameter's, else a gathered copy."""
        p = self.parameter
        if tuple(like.shape) != tuple(p.shape):
            raise ValueError(
                f"{self.name}: expected a tensor of shape {tuple(p.shape)}, got {tuple(like.shape)}"
            )
        if self.is_identity:
            return like
        if like.stride() == p.stride():
            return like.as_strided(self.size, self.stride, like.storage_offset() + self.offset)
        return like.reshape(-1)[self._gather_index().to(like.device)].view(self.size)

    def _gather_index(self) -> torch.Tensor:
        """For every element of the view, the (row-major) index of the parameter element it is."""
        if not self._index:
            p = self.parameter
            param_pos = _positions(tuple(p.shape), tuple(p.stride()), 0).reshape(-1)
            view_pos = _positions(self.size, self.stride, self.offset).reshape(-1)
            order = torch.argsort(param_pos)
            found = order[torch.searchsorted(param_pos[order], view_pos).clamp_max(len(order) - 1)]
            if not torch.equal(param_pos[found], view_pos):
                raise ValueError(f"{self.name}: the weight reads storage outside its parameter")
            self._index.append(found)
        return self._index[0]


def _positions(size: tuple[int, ...], stride: tuple[int, ...], offset: int) -> torch.Tensor:
    """Storage position (elements) of every element of a strided view ``size``."""
    pos = torch.full(size, offset, dtype=torch.long)
    for dim, (n, s) in enumerate(zip(size, stride, strict=True)):
        shape = [1] * len(size)
        shape[dim] = n
        pos = pos + (torch.arange(n) * s).view(shape)
    return pos
