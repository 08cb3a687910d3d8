"""The Ray executor: plans evaluated on actors that each load the model once (the ``ray`` extra).

Each worker is a Ray actor running :class:`~.worker.PointWorker`. A sweep's
:class:`~qk_subspace.evaluation.sweep.SweepJob` (tokens, heads, baseline, options) is put in the object
store once; every worker holds at most one plan at a time, and a worker that finishes gets the next,
so rows come back as they finish (the caller writes them). A worker whose process dies (killed, out of
memory, lost node) is restarted by Ray -- it loads the model again -- and its plan is retried there
(``max_restarts`` times per worker); an exception raised by the evaluation itself is not retried and
fails the sweep with that error.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .worker import ModelSource, PointWorker

if TYPE_CHECKING:
    from ..decomposition.plans import Plan
    from ..evaluation.sweep import SweepJob

__all__ = ["RAY_EXTRA_HINT", "RayExecutor", "import_ray"]

RAY_EXTRA_HINT = 'install the ray extra: pip install "qk-subspace[ray]" (or pip install -e ".[ray]")'


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError naming the extra."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"--executor ray needs Ray, which is not installed; {RAY_EXTRA_HINT}") from None
    return ray


class RayExecutor:
    """Plans evaluated on ``workers`` Ray actors that each load the model once.

    Args:
        address: the Ray cluster (``"auto"``: the one this machine belongs to, ``"HOST:PORT"``; ``"local"``:
            a new local instance); ``None`` joins the instance already initialised in this process, else
            does what ``ray.init()`` does (a cluster started on this machine, else a new local instance).
        workers: actors to start (default: the cluster's CPUs / ``threads_per_worker``, or its GPUs /
            ``gpus_per_worker`` with GPUs).
        gpus_per_worker: GPUs each actor reserves (fractions share a GPU); with GPUs the workers load the
            model on ``"cuda"``.
        threads_per_worker: CPUs each actor reserves and torch threads it uses.
        max_restarts: times a dead worker is restarted (and its plan retried) before the run fails.

    The actors start at the first sweep and are reused while the model stays the same; :meth:`close`
    (or the ``with`` block) ends them, and the local Ray instance if this executor started it.
    """

    name = "ray"
    remote = True

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        threads_per_worker: int = 1,
        max_restarts: int = 3,
    ) -> None:
        import_ray()
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers (--workers) must be an integer >= 1, got {workers!r}")
        if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be an integer >= 1, got {threads_per_worker!r}")
        if not gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker (--gpus-per-worker) must be >= 0, got {gpus_per_worker!r}")
        self.address, self.workers = address, workers
        self.gpus_per_worker, self.threads_per_worker = float(gpus_per_worker), threads_per_worker
        self.max_restarts = max_restarts
        self._actors: list[Any] = []
        self._model: Any = None
        self._started_ray = False

    # ------------------------------------------------------------------ cluster and actors
    def _connect(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, logging_level="WARNING")
            self._started_ray = self.address in (None, "local")
        return ray

    def n_workers(self) -> int:
        """The number of actors this executor starts."""
        if self.workers is not None:
            return self.workers
        resources = self._connect().cluster_resources()
        if self.gpus_per_worker > 0:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.threads_per_worker))

    def _start(self, model: Any) -> list[Any]:
        if self._actors and self._model is model:
            return self._actors
        ray = self._connect()
        self._kill()
        source = ModelSource.of(model, device="cuda" if self.gpus_per_worker > 0 else None)
        actor = ray.remote(
            num_cpus=self.threads_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_restarts,
        )(PointWorker)
        self._actors = [actor.remote(source, self.threads_per_worker) for _ in range(self.n_workers())]
        self._model = model
        return self._actors

    def worker_pids(self) -> list[int]:
        """The process ids of the running workers (in worker order)."""
        ray = self._connect()
        return [int(pid) for pid in ray.get([a.pid.remote() for a in self._actors])]

    # ------------------------------------------------------------------ the executor protocol
    def map(
        self, model: Any, job: SweepJob, plans: Sequence[Plan], *, progress: bool = False
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(index, row)`` of every plan, in the order they finish on the workers."""
        actors = self._start(model)
        ray = self._connect()
        work = ray.put((job, list(plans)))  # together: see PointWorker.evaluate
        queue, idle = deque(enumerate(plans)), deque(actors)
        pending: dict[Any, Any] = {}
        try:
            while queue or pending:
                while queue and idle:
                    worker = idle.popleft()
                    index, _ = queue.popleft()
                    pending[worker.evaluate.remote(work, index)] = worker
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                worker = pending.pop(ready)
                idle.append(worker)
                yield self._result(ray, ready)
        finally:  # the caller stopped early (an error, Ctrl-C): drop what is still queued on the workers
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def _result(self, ray: Any, ref: Any) -> tuple[int, dict[str, Any]]:
        try:
            index, row = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"a Ray worker died {self.max_restarts + 1} times while evaluating a point; the run stops "
                f"(finished points are saved: --resume continues). Cause: {exc}"
            ) from None
        return int(index), row

    def describe(self) -> dict[str, Any]:
        return {
            "name": "ray",
            "address": self.address or "local",
            "workers": self.n_workers(),
            "threads_per_worker": self.threads_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "max_restarts": self.max_restarts,
        }

    def _kill(self) -> None:
        if self._actors:
            ray = import_ray()
            for a in self._actors:
                ray.kill(a, no_restart=True)
        self._actors, self._model = [], None

    def close(self) -> None:
        """End the workers (and the local Ray instance this executor started)."""
        self._kill()
        if self._started_ray:
            import_ray().shutdown()
            self._started_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
