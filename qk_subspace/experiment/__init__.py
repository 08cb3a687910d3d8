"""The experiment runner: config, stages, the resumable results store, the gate across models.

Names are imported on first use, so ``qk_subspace.experiment.config`` (and the CLI's ``--help``) load
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
