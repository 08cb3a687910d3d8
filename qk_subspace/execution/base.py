"""The executor protocol, the serial executor and :func:`make_executor`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..decomposition.plans import Plan
    from ..evaluation.sweep import SweepJob

__all__ = ["EXECUTORS", "Executor", "SerialExecutor", "make_executor", "opened_executor"]

#: The executors by name (``--executor``).
EXECUTORS = ("serial", "ray")


class Executor(Protocol):
    """Evaluates the plans of a sweep and yields ``(index in plans, row)`` as rows finish.

    ``remote`` says whether plans are evaluated on other copies of the model (which then check that
    they hold the same weights as ``model``, :mod:`.fingerprint`).
    """

    name: str
    remote: bool

    def map(
        self, model: Any, job: SweepJob, plans: Sequence[Plan], *, progress: bool = False
    ) -> Iterator[tuple[int, dict[str, Any]]]: ...

    def describe(self) -> dict[str, Any]:
        """The ``metadata.executor`` entry of a results file."""
        ...

    def close(self) -> None: ...


class SerialExecutor:
    """Every plan on the caller's model, one after the other, in order (the default)."""

    name = "serial"
    remote = False

    def map(
        self, model: Any, job: SweepJob, plans: Sequence[Plan], *, progress: bool = False
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, plan in enumerate(plans):
            yield index, job.evaluate(model, plan, progress=progress)

    def describe(self) -> dict[str, Any]:
        return {"name": "serial"}

    def close(self) -> None:
        pass

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(
    name: str = "serial",
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    threads_per_worker: int = 1,
) -> Executor:
    """The executor called ``name`` (``"serial"`` or ``"ray"``; the options apply to ``"ray"``).

    See :class:`~qk_subspace.execution.ray_executor.RayExecutor` for the options.

    Raises:
        ValueError: an unknown name.
        ImportError: ``"ray"`` without Ray installed (``pip install "qk-subspace[ray]"``).
    """
    if name == "serial":
        return SerialExecutor()
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(
            address=address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            threads_per_worker=threads_per_worker,
        )
    raise ValueError(f"executor (--executor) must be one of {list(EXECUTORS)}, got {name!r}")


@contextlib.contextmanager
def opened_executor(given: Executor | str | None, options: Any) -> Iterator[Executor]:
    """``given`` if it is an executor (left open), else one made from ``options`` (an
    :class:`~qk_subspace.experiment.config.ExecutionOptions`) and closed at the end."""
    if given is not None and not isinstance(given, str):
        yield given
        return
    executor = make_executor(
        options.executor,
        address=options.ray_address,
        workers=options.workers,
        gpus_per_worker=options.gpus_per_worker,
        threads_per_worker=options.threads_per_worker,
    )
    try:
        yield executor
    finally:
        executor.close()
