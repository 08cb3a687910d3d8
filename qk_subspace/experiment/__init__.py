"""The experiment runner: config, stages, the resumable results store, the gate across models.

Names are imported on first use, so ``qk_subspace.experiment.config`` (and the CLI's ``--help``) load
without torch.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

__all__ = [
    "STAGES",
    "ConfigMismatchError",
    "ExperimentConfig",
    "ExperimentResult",
    "GateResult",
    "Stage",
    "default_k_grid",
    "gate_check",
    "load_results",
    "pca_map_rows",
    "run_experiment",
    "run_models",
    "variance_summary",
]

_WHERE = {
    "ExperimentConfig": "config",
    "default_k_grid": "context",
    "GateResult": "gate",
    "gate_check": "gate",
    "ExperimentResult": "runner",
    "run_experiment": "runner",
    "run_models": "runner",
    "STAGES": "stages",
    "Stage": "stages",
    "pca_map_rows": "stages",
    "variance_summary": "stages",
    "ConfigMismatchError": "store",
    "load_results": "store",
}


__getattr__ = lazy_getattr(__name__, _WHERE)


def __dir__() -> list[str]:
    return sorted(__all__)
