"""OV injection: realise a target head-space OV circuit for every head exactly, by editing ``W_V``.

Head-space OV form. Head h of layer l reads values ``v = x W_V + b_V`` (``W_V [d_model, d_head]``),
mixes them over positions with its attention pattern into ``z`` (``hook_z``), and writes
``z W_O`` (``W_O [d_head, d_model]``) to the residual stream. TransformerLens exposes the circuit
as ``model.OV = FactoredMatrix(W_V, W_O)``; its ``d_model x d_model`` product is ``W_V W_O`` and its
``d_head x d_head`` "BA" product is ``W_O W_V``. Mirroring the QK form ``W_QK = W_Q^T W_K`` (both
factors ``[d_model, d_head]``, the reading factor first), with ``U = W_O^T`` (``[d_model, d_head]``)
we define

    W_OV[l, h] = W_V^T U = W_V^T W_O^T = (W_O W_V)^T = model.OV.BA^T      # [d_head, d_head]

so ``W_OV[i, j] = <W_V[:, i], W_O[j, :]>``: how much value channel i's read direction overlaps
output channel j's write direction. (PCA across heads is unchanged by transposing every head, so
the choice of transpose only matters for the injection formula below.)

Exact injection through W_V (multi-head attention). With ``U = W_O^T``, ``G = U^T U`` and a
target ``T`` (``[d_head, d_head]``), set

    W_V_new = W_V + U G^{-1} (T - W_V^T U)^T

Then ``W_V_new^T U = W_V^T U + (T - W_V^T U) G^{-1} U^T U = T``, and the correction lies in
``span(U)`` (the row space of ``W_O``), so the component of ``W_V`` outside that span, which the
head-space form does not see but the head's output ``x W_V W_O`` does, is kept: ``T = W_OV``
gives a zero correction and reproduces the model exactly. This is the QK formula with
``(W_Q, W_K) -> (W_V, W_O^T)``.

Grouped-query attention. ``W_V`` is a parameter per key/value head (``attn._W_V``,
``[n_kv_heads, d_model, d_head]``) shared by the ``r = n_heads / n_kv_heads`` query heads of its
group, each with its own ``W_O``. All targets of a group constrain one matrix, so we solve them
jointly: with ``U_g = [U_h1 | ... | U_hr]`` (``[d_model, r d_head]``) and
``R_g = [T_h1 - W_V^T U_h1 | ... | T_hr - W_V^T U_hr]`` (``[d_head, r d_head]``), the minimum-norm
correction

    W_V_new = W_V + U_g (U_g^T U_g)^{-1} R_g^T

satisfies ``W_V_new^T U_h = T_h`` for every head of the group, and again changes ``W_V`` only inside
``span(U_g)``. This is exact whenever ``U_g`` has full column rank (needs ``r d_head <= d_model``,
true for Llama-style models; stories260K: 2 x 8 <= 64). Otherwise ``U_g^T U_g`` is singular and
the pseudoinverse gives the least-squares solution; ``edit.residual`` then reports the miss.
Heads of a group that are *not* selected for editing are constrained to keep their current form,
so their ``W_OV`` is unchanged. Note what is inherent to sharing: a head's full output map
``W_V W_O[h]`` changes whenever ``W_V`` changes, even when its head-space form is held fixed
(``Delta W_O[h] = 0`` with ``W_O[h]`` of full rank forces ``Delta = 0``), so editing one query head
of a group moves its siblings' outputs; :func:`head_output_change` measures that.

Attention patterns do not depend on ``W_V``, so OV edits leave them untouched; the diagnostic is the
change of each head's ``z`` (``hook_z``) and of its residual write ``z W_O``
(:func:`qk_subspace.evaluation.head_outputs.head_output_change`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from ..model.circuits import ov_matrices
from ..model.weights import attention_weight, kv_groups, kv_weight, value_parameter_name
from .head_edit import COND_SINGULAR, COND_WARN, HeadEdit

__all__ = ["OVEdit", "inject_ov", "ov_injection_weights"]


def ov_injection_weights(
    W_V: torch.Tensor,
    W_O: torch.Tensor,
    target: torch.Tensor,
    repeats: int = 1,
    cond_singular: float = COND_SINGULAR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New value weights realising ``target`` (pure function, float64, no writes).

    Args:
        W_V: ``[n_value_heads, d_model, d_head]``, one per key/value head (the parameter).
        W_O: ``[n_heads, d_head, d_model]``, one per query head.
        target: ``[n_heads, d_head, d_head]``, the desired ``W_V[h // repeats]^T W_O[h]^T``.
        repeats: query heads per value head (1 for multi-head attention).
        cond_singular: groups whose ``cond(U_g^T U_g)`` is at least this use the pseudoinverse.

    Returns:
        ``(W_V_new [n_value_heads, d_model, d_head] float64, cond [n_value_heads] float64)``.
    """
    Wv, T = W_V.to(torch.float64), target.to(torch.float64)
    n_v, d_model, d_head = Wv.shape
    if W_O.shape[0] != n_v * repeats or target.shape[0] != n_v * repeats:
        raise ValueError(
            f"W_O and target need n_value_heads * repeats = {n_v * repeats} heads, "
            f"got {W_O.shape[0]} and {target.shape[0]}"
        )
    U = W_O.to(torch.float64).transpose(-1, -2)  # [n_heads, d_model, d_head]
    # Group g stacks its query heads' U side by side: U_g [d_model, r*d_head].
    Ug = U.reshape(n_v, repeats, d_model, d_head).permute(0, 2, 1, 3).reshape(n_v, d_model, repeats * d_head)
    current = Wv.repeat_interleave(repeats, dim=0).transpose(-1, -2) @ U  # [n_heads, d_head, d_head]
    R = (T - current).reshape(n_v, repeats, d_head, d_head).permute(0, 2, 1, 3).reshape(n_v, d_head, -1)
    G = Ug.transpose(-1, -2) @ Ug  # [n_v, r*d_head, r*d_head]
    cond = torch.linalg.cond(G)
    new = torch.empty_like(Wv)
    for g in range(n_v):
        if bool(cond[g] < cond_singular):
            delta = Ug[g] @ torch.linalg.solve(G[g], R[g].transpose(-1, -2))
        else:  # least squares, minimum norm: U_g^T Delta = R_g^T
            delta = torch.linalg.pinv(Ug[g].transpose(-1, -2)) @ R[g].transpose(-1, -2)
        new[g] = Wv[g] + delta
    return new, cond


class OVEdit(HeadEdit):
    """An active OV injection (returned by :func:`inject_ov`); writes only ``W_V`` / ``_W_V``.

    Attributes (set on entry; see :mod:`~qk_subspace.edits.head_edit` for the residuals):
        heads: bool mask ``[n_layers, n_heads]`` of the heads whose target is imposed.
        residual: float64 ``[n_layers, n_heads]``, relative error of ``W_V_new^T W_O^T`` against the
            target for edited heads, and against the head's old form for unselected heads sharing a
            value head with an edited one (0 when their form was kept exactly); 0 elsewhere.
        max_abs_error: the same comparisons as the largest entrywise difference.
        condition_numbers: float64 ``[n_layers, n_value_heads]``, ``cond(U_g^T U_g)`` per group.
    """

    condition_numbers: torch.Tensor
    max_abs_error: torch.Tensor

    def __init__(
        self,
        model: Any,
        target: torch.Tensor,
        heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
        cond_warn: float = COND_WARN,
    ) -> None:
        self._set_targets(model, target, heads, cond_warn)
        super().__init__(model, self._ov_plan, name="inject_ov")

    def _ov_plan(self) -> dict[str, torch.Tensor]:
        model: Any = self.model
        cfg = model.cfg
        n_v, repeats = kv_groups(model)
        conds = torch.zeros(cfg.n_layers, n_v, dtype=torch.float64)
        self._before = ov_matrices(model, torch.float64).cpu()
        plan: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for layer in range(cfg.n_layers):
                mask = self.heads[layer]
                if not mask.any():
                    continue
                W_V = kv_weight(model, layer, "W_V")  # one per key/value head
                W_O = attention_weight(model, layer, "W_O")
                # Unselected heads keep their current form (matters when they share W_V).
                tgt = torch.where(
                    mask[:, None, None].to(W_V.device),
                    self.target[layer].to(W_V.device, torch.float64),
                    self._before[layer].to(W_V.device),
                )
                new, conds[layer] = ov_injection_weights(W_V, W_O, tgt, repeats)
                group_mask = mask.reshape(n_v, repeats).any(dim=1).to(W_V.device)
                new = torch.where(group_mask[:, None, None], new.to(W_V.dtype), W_V.detach())
                plan[value_parameter_name(model, layer)] = new
        touched = self.heads.reshape(cfg.n_layers, n_v, repeats).any(-1)
        labels = [f"L{layer}V{g}" for layer in range(cfg.n_layers) for g in range(n_v)]
        sing = [
            labels[i] for i in torch.nonzero((conds >= COND_SINGULAR).flatten() & touched.flatten()).flatten()
        ]
        warn = [
            labels[i] for i in torch.nonzero((conds > self.cond_warn).flatten() & touched.flatten()).flatten()
        ]
        if sing:
            warnings.warn(
                f"OV injection: the stacked W_O of value groups {sing} is rank deficient; solved in least "
                "squares (see edit.residual for how far the targets are missed)",
                RuntimeWarning,
                stacklevel=3,
            )
        elif warn:
            warnings.warn(
                f"OV injection: W_O W_O^T is badly conditioned (cond > {self.cond_warn:g}) for value groups "
                f"{warn}: the injected circuits may miss their targets (see edit.residual)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.condition_numbers = conds
        return plan

    def _after_enter(self) -> None:
        model: Any = self.model
        cfg = model.cfg
        n_v, repeats = kv_groups(model)
        current = ov_matrices(model, torch.float64).cpu()
        # what each head should now be: its target if selected, its old form if a sibling was edited
        group_touched = (
            self.heads.reshape(cfg.n_layers, n_v, repeats).any(-1).repeat_interleave(repeats, dim=1)
        )
        target = self.target.to("cpu", torch.float64)
        intended = torch.where(self.heads[..., None, None], target, self._before)
        diff = current - intended
        zero = torch.zeros((), dtype=torch.float64)
        covered = group_touched | self.heads
        self._record_residual(
            torch.where(covered, (diff**2).sum(dim=(-1, -2)), zero),
            torch.where(covered, (intended**2).sum(dim=(-1, -2)), zero),
            torch.where(covered, diff.abs().amax(dim=(-1, -2)), zero),
        )


def inject_ov(
    model: Any,
    target: torch.Tensor,
    heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
    cond_warn: float = COND_WARN,
) -> OVEdit:
    """Inject head-space OV circuits by editing ``W_V`` in place; use as a context manager.

    Args:
        model: the model (its ``attn.W_V`` or, grouped-query, ``attn._W_V`` change).
        target: ``[n_layers, n_heads, d_head, d_head]``, the desired ``W_V^T W_O^T`` per head.
        heads: heads to edit (default all), as for :func:`qk_subspace.inject_qk`. In a
            grouped-query model the other heads of an edited group keep their form.
        cond_warn: warn for groups whose ``cond(U_g^T U_g)`` exceeds this.

    Example::

        W = qs.ov_matrices(model)
        pca = qs.HeadPCA().fit(W)
        with qs.inject_ov(model, pca.reconstruct(K=3)) as edit:
            loss = model(tokens, return_type="loss")
            edit.residual.max()
    """
    return OVEdit(model, target, heads=heads, cond_warn=cond_warn)
