"""QK injection: realise a target ``W_Q^T W_K`` for every head exactly, by editing ``W_Q`` in place.

For one head with ``W_Q, W_K`` of shape ``[d_model, d_head]`` and a target ``T`` (``[d_head, d_head]``),
the exact method sets

    W_Q_new = W_Q + W_K (W_K^T W_K)^{-1} (T - W_Q^T W_K)^T

so that ``W_Q_new^T W_K = T`` and the component of ``W_Q`` outside ``span(W_K)`` is unchanged
(the correction lies in ``span(W_K)``). It is computed in float64 with ``torch.linalg.solve``
(no explicit inverse) and cast back to the model's dtype. The ``"pinv"`` method,
``W_Q_new = W_K (W_K^T W_K)^{-1} T^T``, satisfies the same identity but drops the part of
``W_Q`` outside ``span(W_K)``. ``W_Q^T W_K`` does not see that part, but the attention
scores ``x W_Q W_K^T x'^T`` do, so ``pinv`` changes the model even at K = all (the seed report's
warning); so it is kept only for contrast.

Speed (a sweep injects many targets into the same model): what does not depend on the target --
``cond(W_K^T W_K)``, ``W_K (W_K^T W_K)^{-1}`` and ``W_Q^T W_K`` per layer, in float64 -- is cached
per model and reused only while the layer's ``W_Q`` and ``W_K`` are bit-identical to the copies
the entry was built from (compared on every use, so any write, by any route, invalidates it).
The residual is still measured on the weights as written, and only for the layers edited. The
small float64 linear algebra runs on ``INJECTION_THREADS`` (default 1) intra-op threads; the
previous thread setting is restored afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from ..model.heads import head_labels
from ..model.weights import attention_weight, query_parameter_name
from .head_edit import COND_SINGULAR, COND_WARN, HeadEdit

__all__ = [
    "INJECTION_CACHE_MAX_BYTES",
    "INJECTION_THREADS",
    "QKEdit",
    "clear_injection_cache",
    "inject_qk",
    "qk_injection_weights",
]

#: Threads used for the small float64 linear algebra of an injection (None: leave torch's setting).
#: On a loaded 2-core machine torch's thread pool makes these tiny ops many times slower. The setting
#: is process-wide while an injection computes (torch has no per-call thread count).
INJECTION_THREADS: int | None = 1


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block with ``INJECTION_THREADS`` intra-op threads, restoring the previous setting."""
    n = INJECTION_THREADS
    previous = torch.get_num_threads()
    if n is None or n >= previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def qk_injection_weights(
    W_Q: torch.Tensor,
    W_K: torch.Tensor,
    target: torch.Tensor,
    method: Literal["exact", "pinv"] = "exact",
) -> torch.Tensor:
    """New query weights that realise ``target`` (pure function, float64, no writes).

    Args:
        W_Q, W_K: ``[n_heads, d_model, d_head]``.
        target: ``[n_heads, d_head, d_head]``, the desired ``W_Q_new^T W_K``.
        method: ``"exact"`` (keeps W_Q outside span(W_K)) or ``"pinv"`` (drops it).

    Returns:
        ``W_Q_new`` ``[n_heads, d_model, d_head]`` in float64.
    """
    Wq, Wk, T = W_Q.to(torch.float64), W_K.to(torch.float64), target.to(torch.float64)
    G = Wk.transpose(-1, -2) @ Wk
    if method == "exact":
        delta = T - Wq.transpose(-1, -2) @ Wk
        return Wq + Wk @ torch.linalg.solve(G, delta.transpose(-1, -2))
    if method == "pinv":
        return Wk @ torch.linalg.solve(G, T.transpose(-1, -2))
    raise ValueError(f"method must be 'exact' or 'pinv', got {method!r}")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold bit-identical values (same shape, dtype and device)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    as_int = ints.get(a.element_size())
    if a.is_complex() or as_int is None:
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int)))


class _LayerCache:
    """What a QK injection needs of one layer that does not depend on the target.

    Built from the layer's ``W_Q`` and ``W_K`` (``[n_heads, d_model, d_head]``, GQA keys repeated)
    and valid exactly while both are bit-identical to the copies kept here (checked on every use,
    so writes of any kind -- qk_subspace edits, ``load_state_dict``, in-place ``p.mul_``, writes
    through ``p.data`` that bypass torch's version counter -- invalidate it).

    Attributes:
        q_ref, k_ref: copies of ``W_Q`` and ``W_K`` (model dtype) the entry was built from.
        cond: float64 ``[n_heads]`` (CPU), ``torch.linalg.cond(W_K^T W_K)``.
        qk: float64 ``[n_heads, d_head, d_head]``, ``W_Q^T W_K``.
    """

    def __init__(self, W_Q: torch.Tensor, W_K: torch.Tensor) -> None:
        self.q_ref = W_Q.detach().clone()
        self.k_ref = W_K.detach().clone()
        Wq, Wk = W_Q.to(torch.float64), W_K.to(torch.float64)
        self._G = Wk.transpose(-1, -2) @ Wk
        self.cond = torch.linalg.cond(self._G).cpu()
        self.qk = Wq.transpose(-1, -2) @ Wk
        self._M: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory held once :meth:`solved` has run (the float64 solve is the size of W_K in float64)."""
        refs = self.q_ref.numel() * self.q_ref.element_size() + self.k_ref.numel() * self.k_ref.element_size()
        return refs + 8 * (self.k_ref.numel() + self.qk.numel())

    def valid_for(self, W_Q: torch.Tensor, W_K: torch.Tensor) -> bool:
        return _same_bits(self.q_ref, W_Q) and _same_bits(self.k_ref, W_K)

    def solved(self) -> torch.Tensor:
        """``W_K (W_K^T W_K)^{-1}`` float64 ``[n_heads, d_model, d_head]`` (by ``torch.linalg.solve``)."""
        if self._M is None:
            Wk = self.k_ref.to(torch.float64)
            # G is symmetric, so (G^{-1} W_K^T)^T = W_K G^{-1}
            self._M = torch.linalg.solve(self._G, Wk.transpose(-1, -2)).transpose(-1, -2).contiguous()
            del self._G
        return self._M


# model -> {layer: _LayerCache}; entries go away with the model
_QK_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[int, _LayerCache]] = weakref.WeakKeyDictionary()

#: Most bytes the inject_qk cache may hold per model (layers beyond it are computed afresh each time).
#: GPT-2 small in float32 needs ~115 MB; a 7B model would need several GB, mostly on its device.
INJECTION_CACHE_MAX_BYTES = 2 * 2**30


def _layer_cache(model: nn.Module, layer: int, W_Q: torch.Tensor, W_K: torch.Tensor) -> _LayerCache:
    """The cached target-independent quantities of ``layer``, rebuilt if its W_Q or W_K changed."""
    per_model = _QK_CACHE.setdefault(model, {})
    entry = per_model.get(layer)
    if entry is None or not entry.valid_for(W_Q, W_K):
        per_model.pop(layer, None)  # free the stale entry before building the new one
        entry = _LayerCache(W_Q, W_K)
        if sum(e.nbytes for e in per_model.values()) + entry.nbytes <= INJECTION_CACHE_MAX_BYTES:
            per_model[layer] = entry
    return entry


def clear_injection_cache(model: nn.Module | None = None) -> None:
    """Drop the per-layer quantities :func:`inject_qk` caches for ``model`` (all models if None).

    The cache (copies of every layer's ``W_Q`` and ``W_K`` plus ``W_K (W_K^T W_K)^{-1}`` in
    float64: about 115 MB for GPT-2 small in float32, at most ``INJECTION_CACHE_MAX_BYTES`` per model)
    is validated against the live weights on every use and freed with the model; call this only to
    release the memory earlier.
    """
    if model is None:
        _QK_CACHE.clear()
    else:
        _QK_CACHE.pop(model, None)


class QKEdit(HeadEdit):
    """An active QK injection (returned by :func:`inject_qk`); writes only ``W_Q``.

    Attributes (set on entry; see :mod:`~qk_subspace.edits.head_edit` for the residuals):
        heads: bool mask ``[n_layers, n_heads]`` of the edited heads.
        residual: float64 ``[n_layers, n_heads]``, ``||W_Q_new^T W_K - target||_F / ||target||_F``
            measured on the weights as written (model dtype); 0 for heads not edited.
        max_abs_error: float64 ``[n_layers, n_heads]``, ``max |W_Q_new^T W_K - target|``.
        residual_total: the overall relative error.
        condition_numbers: float64 ``[n_layers, n_heads]``, ``cond(W_K^T W_K)`` per head.
    """

    condition_numbers: torch.Tensor
    max_abs_error: torch.Tensor

    def __init__(
        self,
        model: Any,
        target: torch.Tensor,
        heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
        method: Literal["exact", "pinv"] = "exact",
        cond_warn: float = COND_WARN,
    ) -> None:
        if method not in ("exact", "pinv"):
            raise ValueError(f"method must be 'exact' or 'pinv', got {method!r}")
        self._set_targets(model, target, heads, cond_warn)
        self.method = method
        self._checked_finite: list[torch.Tensor] = []
        self._used: dict[int, _LayerCache] = {}
        super().__init__(model, self._qk_plan, name=f"inject_qk(method={method!r})")

    def _known_finite(self, value: torch.Tensor) -> bool:
        return any(value is t for t in self._checked_finite)

    def _qk_plan(self) -> dict[str, torch.Tensor]:
        model = self.model
        cfg = model.cfg
        labels = head_labels(cfg.n_layers, cfg.n_heads)
        conds = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
        plan: dict[str, torch.Tensor] = {}
        self._used = {}
        self._checked_finite = []
        with torch.no_grad(), _one_thread():
            for layer in range(cfg.n_layers):
                mask = self.heads[layer]
                if not mask.any():
                    continue
                W_Q = attention_weight(model, layer, "W_Q")
                W_K = attention_weight(model, layer, "W_K")  # the key/value heads repeated for GQA
                entry = _layer_cache(model, layer, W_Q, W_K)
                conds[layer] = entry.cond
                self._check_singular(labels, layer, conds, mask)
                M = entry.solved()  # W_K (W_K^T W_K)^{-1}  [n_heads, d_model, d_head]
                T = self.target[layer].to(W_Q.device, torch.float64)
                if self.method == "exact":
                    # W_Q + M (T - W_Q^T W_K)^T, summed into the fresh product (never into W_Q itself:
                    # for a float64 model W_Q.to(float64) IS the parameter); W_Q is promoted exactly
                    new = (M @ (T - entry.qk).transpose(-1, -2)).add_(W_Q)
                else:
                    new = M @ T.transpose(-1, -2)
                plan[query_parameter_name(layer)] = self._cast_checked(new, W_Q, mask, labels, layer)
                self._used[layer] = entry
        flagged = torch.nonzero((conds > self.cond_warn).flatten() & self.heads.flatten()).flatten()
        warn = [labels[i] for i in flagged.tolist()]
        if warn:
            warnings.warn(
                f"W_K^T W_K is badly conditioned (cond > {self.cond_warn:g}) for heads {warn}: "
                "the injected circuits may miss their targets (see edit.residual)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.condition_numbers = conds
        return plan

    def _check_singular(self, labels: list[str], layer: int, conds: torch.Tensor, mask: torch.Tensor) -> None:
        n_heads = conds.shape[1]
        bad = {
            labels[layer * n_heads + h]: float(conds[layer, h])
            for h in range(n_heads)
            if mask[h] and not (conds[layer, h] < COND_SINGULAR)
        }
        if bad:
            raise ValueError(
                f"W_K^T W_K is singular for heads {list(bad)} (condition numbers "
                f"{[f'{c:.3g}' for c in bad.values()]}; injection needs < {COND_SINGULAR:g}): their "
                "QK circuit cannot be injected through W_Q; leave them out with heads=..."
            )

    def _cast_checked(
        self, new: torch.Tensor, W_Q: torch.Tensor, mask: torch.Tensor, labels: list[str], layer: int
    ) -> torch.Tensor:
        """``new`` (float64) in the parameter dtype, refused if it overflows; unedited heads keep ``W_Q``."""
        new_cast = new.to(W_Q.dtype)
        # amax propagates NaN and Inf: one cheap pass instead of isfinite's several
        finite = torch.isfinite(new_cast.abs().amax(dim=(-1, -2)))
        overflow = mask.to(W_Q.device) & ~finite
        if overflow.any():
            n_heads = mask.shape[0]
            heads_bad = [labels[layer * n_heads + h] for h in torch.nonzero(overflow).flatten().tolist()]
            raise ValueError(
                f"target for heads {heads_bad} needs query weights that overflow the model dtype "
                f"{W_Q.dtype} (|W_Q| up to {float(new.abs().max()):.3g}); targets must give finite weights"
            )
        if bool(mask.all()):
            if new_cast is W_Q:  # cannot happen (float64 result), but never hand out the parameter
                new_cast = new_cast.clone()
            self._checked_finite.append(new_cast)  # all of it checked above: ParameterEdit skips it
            return new_cast
        # unedited heads keep W_Q; ParameterEdit checks the whole value as usual
        return torch.where(mask.to(W_Q.device)[:, None, None], new_cast, W_Q.detach())

    def _after_enter(self) -> None:
        cfg = self.model.cfg
        shape = (cfg.n_layers, cfg.n_heads)
        max_abs, err_sq, ref_sq = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
        with torch.no_grad(), _one_thread():
            for layer in self._used:
                # measured on the live weights: W_Q as written, W_K as it is now
                W_Q = attention_weight(self.model, layer, "W_Q").to(torch.float64)
                written = W_Q.transpose(-1, -2) @ attention_weight(self.model, layer, "W_K").to(torch.float64)
                T = self.target[layer].to(written.device, torch.float64)
                diff = written - T
                max_abs[layer] = diff.abs().amax(dim=(-1, -2)).cpu()
                err_sq[layer] = (diff**2).sum(dim=(-1, -2)).cpu()
                ref_sq[layer] = (T**2).sum(dim=(-1, -2)).cpu()
        zero = torch.zeros((), dtype=torch.float64)
        keep = self.heads
        self._record_residual(
            torch.where(keep, err_sq, zero), torch.where(keep, ref_sq, zero), torch.where(keep, max_abs, zero)
        )


def inject_qk(
    model: Any,
    target: torch.Tensor,
    heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
    method: Literal["exact", "pinv"] = "exact",
    cond_warn: float = COND_WARN,
) -> QKEdit:
    """Inject QK circuits by editing ``W_Q`` in place; use as a context manager.

    Args:
        model: the model to edit (its ``blocks[l].attn.W_Q`` parameters change).
        target: ``[n_layers, n_heads, d_head, d_head]``, the desired ``W_Q^T W_K`` per head
            (any float dtype; on the model's device type).
        heads: heads to edit (default all): flat indices, ``(layer, head)`` pairs, or a bool mask
            ``[n_layers, n_heads]``. Other heads and all biases are untouched.
        method: ``"exact"`` (default) or ``"pinv"`` (see module docstring).
        cond_warn: warn for heads whose ``cond(W_K^T W_K)`` exceeds this.

    Example::

        with qs.inject_qk(model, pca.reconstruct(K=3)) as edit:
            loss = model(tokens, return_type="loss")
            print(edit.residual.max())
        # W_Q is bit-for-bit the original again here
    """
    return QKEdit(model, target, heads=heads, method=method, cond_warn=cond_warn)
