"""Where the points of a run are evaluated: one after the other here, or on Ray workers.

A sweep (:func:`~qk_subspace.evaluation.sweep.run_sweep`) hands its plans and one
:class:`~qk_subspace.evaluation.sweep.SweepJob` to an executor and takes back one row per plan, in
the order they finish. :class:`~.base.SerialExecutor` evaluates them on the caller's model (the default);
:class:`~.ray_executor.RayExecutor` (the ``ray`` extra) on actors that each load the model once.
:func:`~.base.make_executor` builds either from its name. Nothing here imports ray until a Ray
executor is used.
"""

from __future__ import annotations

from .base import EXECUTORS, Executor, SerialExecutor, make_executor

__all__ = ["EXECUTORS", "Executor", "SerialExecutor", "make_executor"]
