"""The only module that writes model weights: exact in-place injection of QK circuits.

Every change to a parameter in qk_subspace goes through :class:`ParameterEdit`, a context manager
that snapshots the parameters it touches, writes the new values, and restores the snapshots bit
for bit on exit (normal exit, exceptions and ``KeyboardInterrupt`` alike). Other modules (OV
injection, gauge transforms) compute new values and hand them to ``ParameterEdit``; none writes
parameters itself.

QK injection (:func:`inject_qk`). For one head with ``W_Q, W_K`` of shape ``[d_model, d_head]``
and a target ``T`` (``[d_head, d_head]``), the exact method sets

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
import signal
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import FrameType, TracebackType
from typing import Literal

import torch
from torch import nn
from transformer_lens import HookedTransformer

from .circuits import head_labels, parse_heads

__all__ = [
    "ParameterEdit",
    "QKEdit",
    "inject_qk",
    "qk_injection_weights",
    "COND_WARN",
    "COND_SINGULAR",
    "active_edits",
    "weights_version",
]

#: Heads whose ``W_K^T W_K`` has a condition number above this get a warning: in a float32 model
#: the injected ``W_Q`` then meets its target only to about ``cond * 1e-7`` relative error.
COND_WARN = 1e8
#: Above this condition number ``W_K^T W_K`` is treated as singular (float64 cannot solve it).
COND_SINGULAR = 1e14

_STACK_ATTR = "_qk_subspace_edit_stack"
_VERSION_ATTR = "_qk_subspace_weights_version"

PlanLike = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]

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


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) for the duration of the block, then deliver it.

    Python runs signal handlers only in the main thread; elsewhere (or when SIGINT is not
    handled by a Python callable) this does nothing. A SIGINT that arrives inside the block is
    passed to the previous handler on exit (by default raising ``KeyboardInterrupt`` there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    pending: list[FrameType | None] = []

    def _hold(signum: int, frame: FrameType | None) -> None:
        pending.append(frame)

    try:
        signal.signal(signal.SIGINT, _hold)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            previous(signal.SIGINT, pending[-1])


def weights_version(model: nn.Module) -> int:
    """A counter bumped on every write and restore made by qk_subspace (for cache invalidation)."""
    return int(getattr(model, _VERSION_ATTR, 0))


def active_edits(model: nn.Module) -> list[ParameterEdit]:
    """The qk_subspace edits currently active on ``model``, outermost first."""
    return list(getattr(model, _STACK_ATTR, []))


class ParameterEdit:
    """Context manager that writes new parameter values and restores the originals bit for bit.

    Args:
        model: the module whose parameters are edited.
        plan: ``{parameter name: new value}`` (names as in ``model.named_parameters()``), or a
            zero-argument callable returning it, evaluated on ``__enter__`` so that nested edits
            see the weights of the edits around them.
        name: a label used in error messages.

    Guarantees (tests/test_integrity.py):

    * The whole plan is computed and validated (names, shapes, finite values after the cast to
      the parameter dtype) before the first write, so a bad plan writes nothing.
    * On leaving the block -- normally, by an exception or by ``KeyboardInterrupt`` -- every
      edited parameter is restored from a snapshot taken on entry, bit for bit. If anything fails
      during entry (a write, or the subclass hook after the writes), the parameters written so far
      are restored before the error propagates.
    * In the main thread, SIGINT (Ctrl-C) is deferred while parameters are being written or
      restored and delivered right after, so an interrupt can never stop a write loop half-way.
    * A write that raises during restore is retried once, and the remaining parameters are
      restored regardless; the first error is re-raised once all are restored. If a parameter
      still cannot be written, ``RuntimeError`` names it and the edit stays active (and on the
      model's edit stack): call :meth:`restore` again to retry.

    Nested edits compose (the inner one is applied on top of the outer one) and must exit in
    reverse order of entry; exiting out of order raises ``RuntimeError`` and leaves the weights
    as they are. An edit object can be entered only once at a time (entering it again while it
    is active raises ``RuntimeError``); it may be re-entered after it has exited.
    """

    #: How many times a parameter write is attempted during restore before giving up.
    RESTORE_ATTEMPTS = 2

    def __init__(self, model: nn.Module, plan: PlanLike, name: str = "edit") -> None:
        self.model = model
        self._plan = plan
        self.name = name
        # (parameter name, parameter, snapshot of its value on entry), in write order
        self._saved: list[tuple[str, nn.Parameter, torch.Tensor]] | None = None

    # ------------------------------------------------------------- internals
    def _compute_plan(self) -> Mapping[str, torch.Tensor]:
        return self._plan() if callable(self._plan) else self._plan

    def _resolve(self, plan: Mapping[str, torch.Tensor]) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
        params = dict(self.model.named_parameters())
        resolved = []
        for pname, value in plan.items():
            if pname not in params:
                raise KeyError(
                    f"{self.name}: plan names parameter {pname!r}, which the model does not have; "
                    "allowed: names from model.named_parameters()"
                )
            p = params[pname]
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{self.name}: new value for {pname} must be a torch.Tensor of shape {tuple(p.shape)}, "
                    f"got {type(value).__name__}"
                )
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"{self.name}: new value for {pname} has shape {tuple(value.shape)}, "
                    f"the parameter has {tuple(p.shape)}"
                )
            cast = value.detach().to(device=p.device, dtype=p.dtype)
            # checked after the cast: a finite float64 value can overflow a float32/float16 parameter
            known = (
                self._known_finite(value)
                and cast.dtype == value.dtype
                and cast.data_ptr() == value.data_ptr()
            )
            if not known and not torch.isfinite(cast).all():
                raise ValueError(
                    f"{self.name}: new value for {pname} contains NaN or Inf in the parameter dtype "
                    f"{p.dtype} ({int((~torch.isfinite(cast)).sum())} entries); values must be finite"
                )
            resolved.append((pname, p, cast))
        return resolved

    def _known_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` (a plan entry after the cast) was already checked to be all finite.

        Subclasses that check their own plan values (with a more specific message) say so here,
        so that large plans are not scanned twice; the default is ``False`` (always check).
        """
        return False

    @staticmethod
    def _write(param: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)

    def _bump(self) -> None:
        setattr(self.model, _VERSION_ATTR, weights_version(self.model) + 1)

    def _stack(self) -> list[ParameterEdit]:
        stack = getattr(self.model, _STACK_ATTR, None)
        if stack is None:
            stack = []
            setattr(self.model, _STACK_ATTR, stack)
        return stack

    def _restore(self) -> None:
        saved = self._saved
        assert saved is not None
        failed: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        error: BaseException | None = None
        with _sigint_deferred():
            for entry in reversed(saved):
                _, p, old = entry
                for _attempt in range(self.RESTORE_ATTEMPTS):
                    try:
                        self._write(p, old)
                        break
                    except BaseException as exc:  # noqa: BLE001 - must finish restoring
                        error = error or exc
                else:
                    failed.append(entry)
            self._bump()
            if failed:
                self._saved = failed[::-1]
            else:
                self._saved = None
                stack = self._stack()
                if self in stack:
                    stack.remove(self)
            # raised inside the block so that a Ctrl-C held back meanwhile is chained to them, not lost
            if failed:
                raise RuntimeError(
                    f"{self.name}: could not restore parameter(s) {[n for n, _, _ in failed]} "
                    f"({self.RESTORE_ATTEMPTS} attempts each); the other parameters are restored. The edit "
                    "stays active with the original values kept: call .restore() on it again to retry"
                ) from error
            if error is not None:
                raise error

    # ----------------------------------------------------------- protocol
    def __enter__(self) -> ParameterEdit:
        if self._saved is not None:
            raise RuntimeError(
                f"{self.name}: this edit object is already active on the model; entering it twice is "
                "not allowed -- create a new edit object to nest a second edit"
            )
        resolved = self._resolve(self._compute_plan())  # validates everything before any write
        try:
            with _sigint_deferred():
                self._saved = [(n, p, p.detach().clone()) for n, p, _ in resolved]
                self._stack().append(self)
                for _, p, value in resolved:
                    self._write(p, value)
                self._bump()
            self._after_enter()
        except BaseException:
            # `with` does not call __exit__ when __enter__ raises: undo the writes here.
            if self._saved is not None:
                self.restore()
            raise
        return self

    def _after_enter(self) -> None:
        """Hook for subclasses: runs after the weights are written."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def restore(self) -> None:
        """Restore the original weights now (what leaving the ``with`` block does).

        Raises ``RuntimeError`` (weights unchanged) if an edit entered after this one is still
        active on the model: edits must be exited in reverse order of entry.
        """
        if self._saved is None:
            return
        stack = self._stack()
        if stack and stack[-1] is not self:
            raise RuntimeError(
                f"{self.name}: edits must be exited in reverse order of entry, but {stack[-1].name!r} "
                "(entered after this one) is still active; exit it first (qs.active_edits(model) lists "
                "the active edits, innermost last). The weights were left unchanged"
            )
        self._restore()

    @property
    def active(self) -> bool:
        """Whether the edit is currently applied."""
        return self._saved is not None

    def original_values(self) -> dict[str, torch.Tensor]:
        """``{parameter name: value before this edit}`` for every parameter it wrote ({} if inactive).

        The tensors are the edit's own snapshots: read them, never modify them.
        """
        return {name: old for name, _, old in (self._saved or [])}


def _check_target(model: HookedTransformer, target: torch.Tensor) -> None:
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
    model_device = model.W_U.device
    if target.device.type != model_device.type:
        raise ValueError(
            f"target is on device {target.device}, but it must be on the model's device type "
            f"({model_device}); move it with target.to({str(model_device)!r})"
        )
    if not torch.isfinite(target).all():
        bad = (~torch.isfinite(target).reshape(cfg.n_layers, cfg.n_heads, -1).all(-1)).flatten()
        labels = head_labels(cfg.n_layers, cfg.n_heads)
        heads = [labels[i] for i in torch.nonzero(bad).flatten().tolist()]
        raise ValueError(
            f"target must be finite, but it contains NaN or Inf for {len(heads)} head(s) {heads[:10]}"
        )


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


class QKEdit(ParameterEdit):
    """An active QK injection (returned by :func:`inject_qk`).

    Attributes (set on entry):
        heads: bool mask ``[n_layers, n_heads]`` of the edited heads.
        residual: float64 ``[n_layers, n_heads]``, per head ``max |W_Q_new^T W_K - target|``
            measured on the weights as written (model dtype); 0 for heads not edited.
        condition_numbers: float64 ``[n_layers, n_heads]``, ``cond(W_K^T W_K)`` per head.
    """

    heads: torch.Tensor
    residual: torch.Tensor
    condition_numbers: torch.Tensor

    def __init__(
        self,
        model: HookedTransformer,
        target: torch.Tensor,
        heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
        method: Literal["exact", "pinv"] = "exact",
        cond_warn: float = COND_WARN,
    ) -> None:
        if method not in ("exact", "pinv"):
            raise ValueError(f"method must be 'exact' or 'pinv', got {method!r}")
        _check_target(model, target)
        cfg = model.cfg
        self.heads = parse_heads(heads, cfg.n_layers, cfg.n_heads)
        self.target = target
        self.method = method
        self.cond_warn = cond_warn
        self._checked_finite: list[torch.Tensor] = []
        self._used: dict[int, _LayerCache] = {}
        super().__init__(model, self._qk_plan, name=f"inject_qk(method={method!r})")

    def _known_finite(self, value: torch.Tensor) -> bool:
        return any(value is t for t in self._checked_finite)

    def _qk_plan(self) -> dict[str, torch.Tensor]:
        model: HookedTransformer = self.model  # type: ignore[assignment]
        cfg = model.cfg
        labels = head_labels(cfg.n_layers, cfg.n_heads)
        conds = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
        plan: dict[str, torch.Tensor] = {}
        self._used = {}
        self._checked_finite = []
        with torch.no_grad(), _one_thread():
            for layer, block in enumerate(model.blocks):
                mask = self.heads[layer]
                if not mask.any():
                    continue
                attn = block.attn
                W_Q, W_K = attn.W_Q, attn.W_K  # W_K repeats the key/value heads for GQA
                entry = _layer_cache(model, layer, W_Q, W_K)
                conds[layer] = entry.cond
                bad = {
                    labels[layer * cfg.n_heads + h]: float(conds[layer, h])
                    for h in range(cfg.n_heads)
                    if mask[h] and not (conds[layer, h] < COND_SINGULAR)
                }
                if bad:
                    raise ValueError(
                        f"W_K^T W_K is singular for heads {list(bad)} (condition numbers "
                        f"{[f'{c:.3g}' for c in bad.values()]}; injection needs < {COND_SINGULAR:g}): their "
                        "QK circuit cannot be injected through W_Q; leave them out with heads=..."
                    )
                M = entry.solved()  # W_K (W_K^T W_K)^{-1}  [n_heads, d_model, d_head]
                T = self.target[layer].to(W_Q.device, torch.float64)
                if self.method == "exact":
                    # W_Q + M (T - W_Q^T W_K)^T, summed into the fresh product (never into W_Q itself:
                    # for a float64 model W_Q.to(float64) IS the parameter); W_Q is promoted exactly
                    new = (M @ (T - entry.qk).transpose(-1, -2)).add_(W_Q)
                else:
                    new = M @ T.transpose(-1, -2)
                new_cast = new.to(W_Q.dtype)
                # amax propagates NaN and Inf: one cheap pass instead of isfinite's several
                finite = torch.isfinite(new_cast.abs().amax(dim=(-1, -2)))
                overflow = mask.to(W_Q.device) & ~finite
                if overflow.any():
                    heads_bad = [
                        labels[layer * cfg.n_heads + h] for h in torch.nonzero(overflow).flatten().tolist()
                    ]
                    raise ValueError(
                        f"target for heads {heads_bad} needs query weights that overflow the model dtype "
                        f"{W_Q.dtype} (|W_Q| up to {float(new.abs().max()):.3g}); targets must give finite weights"
                    )
                if bool(mask.all()):
                    if new_cast is W_Q:  # cannot happen (float64 result), but never hand out the parameter
                        new_cast = new_cast.clone()
                    self._checked_finite.append(new_cast)  # all of it checked above: ParameterEdit skips it
                else:  # unedited heads keep W_Q; ParameterEdit checks the whole value as usual
                    new_cast = torch.where(mask.to(W_Q.device)[:, None, None], new_cast, W_Q.detach())
                plan[f"blocks.{layer}.attn.W_Q"] = new_cast
                self._used[layer] = entry
        warn = [
            labels[i]
            for i in torch.nonzero((conds > self.cond_warn).flatten() & self.heads.flatten())
            .flatten()
            .tolist()
        ]
        if warn:
            warnings.warn(
                f"W_K^T W_K is badly conditioned (cond > {self.cond_warn:g}) for heads {warn}: "
                "the injected circuits may miss their targets (see edit.residual)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.condition_numbers = conds
        return plan

    def _after_enter(self) -> None:
        model: HookedTransformer = self.model  # type: ignore[assignment]
        cfg = model.cfg
        residual = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
        with torch.no_grad(), _one_thread():
            for layer in self._used:
                attn = model.blocks[layer].attn
                # measured on the live weights: W_Q as written, W_K as it is now
                written = attn.W_Q.to(torch.float64).transpose(-1, -2) @ attn.W_K.to(torch.float64)
                T = self.target[layer].to(written.device, torch.float64)
                residual[layer] = (written - T).abs().amax(dim=(-1, -2)).cpu()
        self.residual = torch.where(self.heads, residual, torch.zeros((), dtype=torch.float64))
        assert self.residual.shape == (cfg.n_layers, cfg.n_heads)


def inject_qk(
    model: HookedTransformer,
    target: torch.Tensor,
    heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor | None = None,
    method: Literal["exact", "pinv"] = "exact",
    cond_warn: float = COND_WARN,
) -> QKEdit:
    """Inject QK circuits by editing ``W_Q`` in place; use as a context manager.

    Args:
        model: the HookedTransformer to edit (its ``blocks[l].attn.W_Q`` parameters change).
        target: ``[n_layers, n_heads, d_head, d_head]``, the desired ``W_Q^T W_K`` per head
            (any float dtype; on the model's device type).
        heads: heads to edit (default all): flat indices, ``(layer, head)`` pairs, or a bool mask
            ``[n_layers, n_heads]``. Other heads and all biases are untouched.
        method: ``"exact"`` (default) or ``"pinv"`` (see module docstring).
        cond_warn: warn for heads whose ``cond(W_K^T W_K)`` exceeds this.

    Example::

        with qs.inject_qk(model, pca.reconstruct(K=100)) as edit:
            loss = model(tokens, return_type="loss")
            print(edit.residual.max())
        # W_Q is bit-for-bit the original again here
    """
    return QKEdit(model, target, heads=heads, method=method, cond_warn=cond_warn)
