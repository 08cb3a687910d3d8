"""The edit of per-head circuits: a :class:`~qk_subspace.edits.parameter_edit.ParameterEdit` that
realises a target for every head of one representation and says how well it did.

Every edit of a representation (``QKEdit``, ``OVEdit``, ``CircuitEdit``) is a :class:`HeadEdit`.
After entry it carries one residual with one meaning for every kind:

* ``residual`` ``[n_layers, n_heads]`` float64: per head, the relative Frobenius error
  ``||realised - intended||_F / ||intended||_F`` of its circuit in the representation's own units
  (``intended`` is the target for heads the edit imposes one on, and the head's own form before the
  edit for heads it must keep, e.g. the siblings of an edited grouped-query value head); the absolute
  norm where ``intended`` is zero; 0 for heads the edit leaves alone;
* ``residual_total``: ``sqrt(sum ||realised - intended||^2 / sum ||intended||^2)`` over those heads;
* ``max_abs_error`` ``[n_layers, n_heads]`` float64 or ``None``: the largest entrywise
  ``|realised - intended|`` where the realised matrix is formed (head-space ``d_head x d_head``
  circuits; ``None`` for ``d_model x d_model`` circuits, which are never materialised).
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.heads import head_labels, parse_heads
from ..model.weights import model_device
from .parameter_edit import ParameterEdit

__all__ = ["COND_SINGULAR", "COND_WARN", "HeadEdit", "check_head_targets"]

#: Heads (or groups) whose Gram matrix has a condition number above this get a warning: in a float32
#: model the injected weights then meet their target only to about ``cond * 1e-7`` relative error.
COND_WARN = 1e8
#: Above this condition number the Gram matrix is treated as singular (float64 cannot solve it).
COND_SINGULAR = 1e14


class HeadEdit(ParameterEdit):
    """A :class:`ParameterEdit` realising per-head targets; see the module docstring for the residual.

    Attributes (set on entry): ``heads`` (bool ``[n_layers, n_heads]``, the heads given a target),
    ``residual``, ``residual_total``, ``max_abs_error``.
    """

    model: Any  # a HookedTransformer or TransformerBridge (its cfg and blocks are read)
    heads: torch.Tensor
    residual: torch.Tensor
    residual_total: float
    max_abs_error: torch.Tensor | None = None

    def _set_targets(self, model: Any, target: torch.Tensor, heads: Any, cond_warn: float) -> None:
        """Check head-space targets ``[n_layers, n_heads, d_head, d_head]`` and keep them with the heads to edit."""
        check_head_targets(model, target)
        self.heads = parse_heads(heads, model.cfg.n_layers, model.cfg.n_heads)
        self.target = target
        self.cond_warn = cond_warn

    def _record_residual(
        self, error_sq: torch.Tensor, intended_sq: torch.Tensor, max_abs: torch.Tensor | None = None
    ) -> None:
        """Set the residual attributes from per-head ``||realised - intended||^2`` and ``||intended||^2``
        (``[n_layers, n_heads]``, zero for heads left alone) and the optional entrywise maxima."""
        err, ref = error_sq.to(torch.float64).cpu(), intended_sq.to(torch.float64).cpu()
        self.residual = torch.where(ref > 0, err / torch.where(ref > 0, ref, 1.0), err).clamp_min(0).sqrt()
        total_ref = float(ref.sum())
        self.residual_total = float((err.sum() / total_ref if total_ref > 0 else err.sum()).sqrt())
        self.max_abs_error = None if max_abs is None else max_abs.to(torch.float64).cpu()


def check_head_targets(model: Any, target: torch.Tensor) -> None:
    """Check a head-space target ``[n_layers, n_heads, d_head, d_head]``: type, shape, dtype, device, finite."""
    cfg = model.cfg
    expected = (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of shape {expected}, got {type(target).__name__}")
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape [n_layers, n_heads, d_head, d_head] = {expected}, got {tuple(target.shape)}"
        )
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor (float32/float64), got dtype {target.dtype}")
    device = model_device(model)
    if target.device.type != device.type:
        raise ValueError(
            f"target is on device {target.device}, but it must be on the model's device type "
            f"({device}); move it with target.to({str(device)!r})"
        )
    if not torch.isfinite(target).all():
        bad = (~torch.isfinite(target).reshape(cfg.n_layers, cfg.n_heads, -1).all(-1)).flatten()
        labels = head_labels(cfg.n_layers, cfg.n_heads)
        heads = [labels[i] for i in torch.nonzero(bad).flatten().tolist()]
        raise ValueError(
            f"target must be finite, but it contains NaN or Inf for {len(heads)} head(s) {heads[:10]}"
        )
