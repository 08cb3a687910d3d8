"""OV circuits: head-space OV matrices, exact in-place injection through ``W_V``, and diagnostics.

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
change of each head's ``z`` (``hook_z``) and of its residual write ``z W_O``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformer_lens import FactoredMatrix, HookedTransformer

from .circuits import parse_heads, qk_matrices
from .injection import COND_SINGULAR, COND_WARN, ParameterEdit, inject_qk

__all__ = [
    "CIRCUITS",
    "OVEdit",
    "circuit_matrices",
    "head_output_change",
    "inject_circuit",
    "inject_ov",
    "ov_injection_weights",
    "ov_matrices",
    "value_parameter_name",
]

Circuit = Literal["qk", "ov"]
#: The circuits the pipeline handles.
CIRCUITS: tuple[str, ...] = ("qk", "ov")


def _check_circuit(circuit: str) -> str:
    if circuit not in CIRCUITS:
        raise ValueError(f"circuit must be one of {list(CIRCUITS)}, got {circuit!r}")
    return circuit


def ov_matrices(model: HookedTransformer, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Every head's head-space OV matrix ``W_V^T W_O^T = model.OV.BA^T``.

    Args:
        model: any HookedTransformer (for grouped-query models ``attn.W_V`` repeats the shared
            value weights, so every query head gets its group's ``W_V``).
        dtype: dtype in which the product is formed (default float64); ``None`` keeps the model's.

    Returns:
        ``[n_layers, n_heads, d_head, d_head]``, detached, on the model's device.
    """
    with torch.no_grad():
        ov: FactoredMatrix = model.OV
        if dtype is not None:
            ov = FactoredMatrix(ov.A.to(dtype), ov.B.to(dtype))
        return ov.BA.transpose(-1, -2).detach().clone()


def circuit_matrices(
    model: HookedTransformer, circuit: Circuit = "qk", dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """``qk_matrices`` or ``ov_matrices`` by name: ``[n_layers, n_heads, d_head, d_head]``."""
    return qk_matrices(model, dtype) if _check_circuit(circuit) == "qk" else ov_matrices(model, dtype)


def value_parameter_name(model: HookedTransformer, layer: int) -> str:
    """Name of layer ``layer``'s value-weight parameter: ``attn.W_V`` or, grouped-query, ``attn._W_V``."""
    attn = model.blocks[layer].attn
    return f"blocks.{layer}.attn._W_V" if hasattr(attn, "_W_V") else f"blocks.{layer}.attn.W_V"


def _groups(model: HookedTransformer) -> tuple[int, int]:
    """``(n_value_heads, repeats)``: query head h uses value head ``h // repeats``."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    return n_kv, cfg.n_heads // n_kv


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


class OVEdit(ParameterEdit):
    """An active OV injection (returned by :func:`inject_ov`); writes only ``W_V`` / ``_W_V``.

    Attributes (set on entry):
        heads: bool mask ``[n_layers, n_heads]`` of the heads whose target is imposed.
        residual: float64 ``[n_layers, n_heads]``: ``max |W_V_new^T W_O^T - target|`` for edited
            heads, and ``max |W_OV_new - W_OV_old|`` for unselected heads sharing a value head
            with an edited one (0 when their form was kept exactly); 0 elsewhere.
        condition_numbers: float64 ``[n_layers, n_value_heads]``, ``cond(U_g^T U_g)`` per group.
    """

    heads: torch.Tensor
    residual: torch.Tensor
    condition_numbers: torch.Tensor

    def __init__(
        self,
        model: HookedTransformer,
        target: torch.Tensor,
        heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
        cond_warn: float = COND_WARN,
    ) -> None:
        from .injection import _check_target

        _check_target(model, target)
        cfg = model.cfg
        self.heads = parse_heads(heads, cfg.n_layers, cfg.n_heads)
        self.target = target
        self.cond_warn = cond_warn
        super().__init__(model, self._ov_plan, name="inject_ov")

    def _ov_plan(self) -> dict[str, torch.Tensor]:
        model: HookedTransformer = self.model  # type: ignore[assignment]
        cfg = model.cfg
        n_v, repeats = _groups(model)
        conds = torch.zeros(cfg.n_layers, n_v, dtype=torch.float64)
        self._before = ov_matrices(model, torch.float64).cpu()
        plan: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for layer, block in enumerate(model.blocks):
                mask = self.heads[layer]
                if not mask.any():
                    continue
                attn = block.attn
                W_V: torch.Tensor = attn._W_V if hasattr(attn, "_W_V") else attn.W_V  # type: ignore[assignment]
                W_O: torch.Tensor = attn.W_O  # type: ignore[assignment]
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
        model: HookedTransformer = self.model  # type: ignore[assignment]
        cfg = model.cfg
        n_v, repeats = _groups(model)
        current = ov_matrices(model, torch.float64).cpu()
        hit = (current - self.target.to("cpu", torch.float64)).abs().amax(dim=(-1, -2))
        kept = (current - self._before).abs().amax(dim=(-1, -2))
        group_touched = (
            self.heads.reshape(cfg.n_layers, n_v, repeats).any(-1).repeat_interleave(repeats, dim=1)
        )
        zero = torch.zeros((), dtype=torch.float64)
        self.residual = torch.where(self.heads, hit, torch.where(group_touched, kept, zero))


def inject_ov(
    model: HookedTransformer,
    target: torch.Tensor,
    heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
    cond_warn: float = COND_WARN,
) -> OVEdit:
    """Inject head-space OV circuits by editing ``W_V`` in place; use as a context manager.

    Args:
        model: the HookedTransformer (its ``attn.W_V`` or, grouped-query, ``attn._W_V`` change).
        target: ``[n_layers, n_heads, d_head, d_head]``, the desired ``W_V^T W_O^T`` per head.
        heads: heads to edit (default all), as for :func:`qk_subspace.inject_qk`. In a
            grouped-query model the other heads of an edited group keep their form.
        cond_warn: warn for groups whose ``cond(U_g^T U_g)`` exceeds this.

    Example::

        W = qs.ov_matrices(model)
        pca = qs.HeadPCA().fit(W)
        with qs.inject_ov(model, pca.reconstruct(K=20)) as edit:
            loss = model(tokens, return_type="loss")
            edit.residual.max()
    """
    return OVEdit(model, target, heads=heads, cond_warn=cond_warn)


def inject_circuit(
    model: HookedTransformer,
    target: torch.Tensor,
    circuit: Circuit = "qk",
    heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
) -> ParameterEdit:
    """:func:`~qk_subspace.inject_qk` (edits ``W_Q``) or :func:`inject_ov` (edits ``W_V``) by name."""
    if _check_circuit(circuit) == "qk":
        return inject_qk(model, target, heads=heads)
    return inject_ov(model, target, heads=heads)


def head_output_change(
    model: HookedTransformer,
    tokens: torch.Tensor,
    edit: Callable[[], AbstractContextManager],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Relative change of every head's output under an edit (total effect, through earlier layers too).

    Args:
        model: the model.
        tokens: ``[n_chunks, ctx]``.
        edit: zero-argument callable returning a fresh edit context manager, e.g.
            ``lambda: qs.inject_ov(model, target)`` (works for QK edits too).
        batch_size: chunks per forward pass.

    Returns:
        ``{"z": [n_layers, n_heads], "write": [n_layers, n_heads]}`` float64:
        ``||z_edit - z|| / ||z||`` over all chunks and positions (``hook_z``, ``[.., d_head]``), and
        the same for the residual write ``z W_O`` (``[.., d_model]``; ``W_O`` of the unedited model,
        which QK and OV edits do not change).
    """
    from .evaluation import validate_tokens

    validate_tokens(model, tokens)
    cfg = model.cfg
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    W_O = torch.stack([b.attn.W_O.detach() for b in model.blocks])  # [n_layers, n_heads, d_head, d_model]
    sums = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in ("dz", "z", "dw", "w")}
    device = model.W_U.device

    def run() -> list[torch.Tensor]:
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
        return [cache[n].double() for n in names]  # each [b, pos, n_heads, d_head]

    with torch.no_grad():
        for start in tqdm(
            range(0, len(tokens), batch_size), desc="head outputs", disable=not progress, leave=False
        ):
            batch = tokens[start : start + batch_size].long().to(device)
            base = run()
            with edit():
                edited = run()
            for layer, (z0, z1) in enumerate(zip(base, edited, strict=False)):
                w0 = torch.einsum("bphd,hdm->bphm", z0, W_O[layer].double())
                w1 = torch.einsum("bphd,hdm->bphm", z1, W_O[layer].double())
                sums["dz"][layer] += ((z1 - z0) ** 2).sum(dim=(0, 1, 3)).cpu().numpy()
                sums["z"][layer] += (z0**2).sum(dim=(0, 1, 3)).cpu().numpy()
                sums["dw"][layer] += ((w1 - w0) ** 2).sum(dim=(0, 1, 3)).cpu().numpy()
                sums["w"][layer] += (w0**2).sum(dim=(0, 1, 3)).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "z": np.sqrt(sums["dz"] / sums["z"]),
            "write": np.sqrt(sums["dw"] / sums["w"]),
        }
