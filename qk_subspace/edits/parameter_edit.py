"""The only code that writes model weights: :class:`ParameterEdit`.

Every change to a parameter in qk_subspace goes through :class:`ParameterEdit`, a context manager
that snapshots the parameters it touches, writes the new values, and restores the snapshots bit
for bit on exit (normal exit, exceptions and ``KeyboardInterrupt`` alike). The edits of circuits
(:mod:`~qk_subspace.edits.qk`, :mod:`~qk_subspace.edits.ov`, :mod:`~qk_subspace.edits.circuit`) and
the gauge transforms (:mod:`~qk_subspace.edits.gauge`) compute new values and hand them to
``ParameterEdit``; none writes parameters itself.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType, TracebackType

import torch
from torch import nn

from ..model.slots import WeightSlot
from ..model.weights import weight_slots

__all__ = ["ParameterEdit", "PlanLike", "active_edits", "weights_version"]

_STACK_ATTR = "_qk_subspace_edit_stack"
_VERSION_ATTR = "_qk_subspace_weights_version"

#: ``{parameter name: new value}``, or a zero-argument callable returning it (evaluated on entry).
PlanLike = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]


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
        plan: ``{weight name: new value}`` (names of :func:`qk_subspace.model.weights.weight_slots`: the
            model's parameter names, and on a ``TransformerBridge`` also the TransformerLens names of the
            attention weights, ``blocks.{l}.attn.W_Q`` ``[n_heads, d_model, d_head]``, which are views of
            the Hugging Face parameters), or a zero-argument callable returning it, evaluated on
            ``__enter__`` so that nested edits see the weights of the edits around them.
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
        # (weight name, slot, snapshot of its value on entry), in write order
        self._saved: list[tuple[str, WeightSlot, torch.Tensor]] | None = None

    # ------------------------------------------------------------- internals
    def _compute_plan(self) -> Mapping[str, torch.Tensor]:
        return self._plan() if callable(self._plan) else self._plan

    def _resolve(self, plan: Mapping[str, torch.Tensor]) -> list[tuple[str, WeightSlot, torch.Tensor]]:
        slots = weight_slots(self.model) if plan else {}
        resolved = []
        for pname, value in plan.items():
            if pname not in slots:
                raise KeyError(
                    f"{self.name}: plan names parameter {pname!r}, which the model does not have; "
                    "allowed: names from model.named_parameters() (and, on a TransformerBridge, the "
                    "TransformerLens attention names blocks.{l}.attn.W_Q, ...)"
                )
            slot = slots[pname]
            p = slot.parameter
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{self.name}: new value for {pname} must be a torch.Tensor of shape {slot.shape}, "
                    f"got {type(value).__name__}"
                )
            if tuple(value.shape) != slot.shape:
                raise ValueError(
                    f"{self.name}: new value for {pname} has shape {tuple(value.shape)}, "
                    f"the parameter has {slot.shape}"
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
            resolved.append((pname, slot, cast))
        return resolved

    def _known_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` (a plan entry after the cast) was already checked to be all finite.

        Subclasses that check their own plan values (with a more specific message) say so here,
        so that large plans are not scanned twice; the default is ``False`` (always check).
        """
        return False

    @staticmethod
    def _write(slot: WeightSlot, value: torch.Tensor) -> None:
        with torch.no_grad():
            slot.value().copy_(value)

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
        failed: list[tuple[str, WeightSlot, torch.Tensor]] = []
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
                self._saved = [(n, slot, slot.value().detach().clone()) for n, slot, _ in resolved]
                self._stack().append(self)
                for _, slot, value in resolved:
                    self._write(slot, value)
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
