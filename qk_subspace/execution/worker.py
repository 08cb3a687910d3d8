"""A worker: loads the model once and evaluates plans of sweep jobs on it (no Ray in this module).

:class:`~.ray_executor.RayExecutor` runs :class:`PointWorker` as a Ray actor; it is a plain class, so
the same code can be tested and used in-process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .fingerprint import weights_fingerprint

if TYPE_CHECKING:
    from ..decomposition.plans import Plan
    from ..evaluation.sweep import SweepJob

__all__ = ["ModelSource", "PointWorker", "WeightsMismatchError"]


class WeightsMismatchError(RuntimeError):
    """A worker's model does not hold the weights the sweep runs on."""


@dataclass(frozen=True)
class ModelSource:
    """How a worker gets the model: the arguments of :func:`~qk_subspace.model.loading.load_model`
    (``model.qk_subspace_load_arguments``), or the model itself (pickled) when it cannot be reloaded.

    Attributes:
        arguments: keyword arguments of ``load_model`` (``name_or_path``, ``dtype`` as a name, ...).
        model: the model object, when ``arguments`` is ``None``.
        device: the workers' device instead of the one in ``arguments`` (e.g. ``"cuda"`` on GPU workers).
    """

    arguments: dict[str, Any] | None = None
    model: Any = field(default=None, repr=False)
    device: str | None = None

    @classmethod
    def of(cls, model: Any, device: str | None = None) -> ModelSource:
        """The source of a loaded model (its load arguments if it has them)."""
        arguments = getattr(model, "qk_subspace_load_arguments", None)
        if arguments is not None:
            return cls(arguments=dict(arguments), device=device)
        return cls(model=model, device=device)

    def load(self) -> Any:
        """The model, loaded (or unpickled) in this process."""
        if self.arguments is None:
            model = self.model
            return model.to(self.device) if self.device is not None else model
        from ..model.loading import load_model

        kwargs = dict(self.arguments)
        name = kwargs.pop("name_or_path")
        dtype = getattr(torch, kwargs.pop("dtype"))
        if self.device is not None:
            kwargs["device"] = self.device
        return load_model(name, dtype=dtype, **kwargs)


class PointWorker:
    """Holds one model; evaluates one plan of a job at a time, restoring the weights after each.

    Args:
        source: where the model comes from.
        threads: torch intra-op threads of this worker (``None``: leave torch's default).
    """

    def __init__(self, source: ModelSource, threads: int | None = 1) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = source.load()

    def pid(self) -> int:
        """This worker's process id."""
        return os.getpid()

    def evaluate(self, work: tuple[SweepJob, Sequence[Plan]], index: int) -> tuple[int, dict[str, Any]]:
        """``(index, row)`` of plan ``index`` of ``work = (job, plans)``, inside the job's representation context.

        The job and its plans travel as one object: a plan's mixing may refer to the very feature
        array of the job's heads (an exact factored product, :class:`~qk_subspace.representations.mixing.DenseMixing`),
        and that identity survives only if they are unpickled together.
        """
        job, plans = work
        plan = plans[index]
        with job.representation.context(self.model):
            if job.weights is not None and weights_fingerprint(self.model) != job.weights:
                raise WeightsMismatchError(
                    f"plan {plan.label}: this worker's model does not hold the weights the sweep runs on "
                    "(a model edited in place after loading, or another checkpoint at the same path on "
                    "this node); load the model unedited on the driver, or use the serial executor"
                )
            return index, job.evaluate(self.model, plan)
