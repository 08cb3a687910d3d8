"""qk_subspace: do attention heads share a low-dimensional weight subspace, and what breaks when you
force them into it? A toolkit on TransformerLens.

The data flow, one subpackage per step:

    model/            load a model; its attention weights, head indexing, the fast evaluation path
    representations/  every head's circuit in one representation ("qk", "qk-canonical", "qk-circuit", "ov")
    decomposition/    PCA across heads, clustering, null spectra, plans (reconstructions as head mixings)
    edits/            the one weight writer (ParameterEdit) and the edits that realise reconstructions
    evaluation/       perplexity, the sweep engine and the sweeps, attention diagnostics, importance
    experiment/       the runner: config, stages, the resumable results store
    viz/, report/     figures and report.md, functions of the results JSON

The names below are loaded on first use: ``import qk_subspace`` imports neither torch nor plotly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_WHERE = {
    "load_model": "model.loading",
    "qk_matrices": "model.circuits",
    "ov_matrices": "model.circuits",
    "HeadPCA": "decomposition.pca",
    "cluster_heads": "decomposition.clustering",
    "Mixing": "representations.mixing",
    "ParameterEdit": "edits.parameter_edit",
    "active_edits": "edits.parameter_edit",
    "inject_qk": "edits.qk",
    "inject_ov": "edits.ov",
    "random_gauge": "edits.gauge",
    "canonical_gauge": "edits.gauge",
    "perplexity": "evaluation.perplexity",
    "paired_ratio": "evaluation.perplexity",
    "PerplexityResult": "evaluation.perplexity",
    "chunk_text": "evaluation.tokens",
    "load_wikitext2": "evaluation.tokens",
    "run_sweep": "evaluation.sweep",
    "sweep": "evaluation.sweeps",
    "sweep_k": "evaluation.sweeps",
    "sweep_clusters": "evaluation.sweeps",
    "attention_diagnostics": "evaluation.diagnostics",
    "head_patterns": "evaluation.diagnostics",
    "component_importance": "evaluation.importance",
    "gauge_study": "evaluation.gauge_study",
    "compare_spaces": "evaluation.compare",
    "ExperimentConfig": "experiment.config",
    "run_experiment": "experiment.runner",
    "run_models": "experiment.runner",
    "load_results": "experiment.store",
}

__all__ = [
    "__version__",
    "load_model",
    "qk_matrices",
    "ov_matrices",
    "HeadPCA",
    "cluster_heads",
    "Mixing",
    "ParameterEdit",
    "active_edits",
    "inject_qk",
    "inject_ov",
    "random_gauge",
    "canonical_gauge",
    "perplexity",
    "paired_ratio",
    "PerplexityResult",
    "chunk_text",
    "load_wikitext2",
    "run_sweep",
    "sweep",
    "sweep_k",
    "sweep_clusters",
    "attention_diagnostics",
    "head_patterns",
    "component_importance",
    "gauge_study",
    "compare_spaces",
    "ExperimentConfig",
    "run_experiment",
    "run_models",
    "load_results",
    "model",
    "representations",
    "decomposition",
    "edits",
    "evaluation",
    "experiment",
    "viz",
    "report",
]


__getattr__ = lazy_getattr(__name__, _WHERE)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from . import decomposition, edits, evaluation, experiment, model, report, representations, viz
    from .decomposition.clustering import cluster_heads
    from .decomposition.pca import HeadPCA
    from .edits.gauge import canonical_gauge, random_gauge
    from .edits.ov import inject_ov
    from .edits.parameter_edit import ParameterEdit, active_edits
    from .edits.qk import inject_qk
    from .evaluation.compare import compare_spaces
    from .evaluation.diagnostics import attention_diagnostics, head_patterns
    from .evaluation.gauge_study import gauge_study
    from .evaluation.importance import component_importance
    from .evaluation.perplexity import PerplexityResult, paired_ratio, perplexity
    from .evaluation.sweep import run_sweep
    from .evaluation.sweeps import sweep, sweep_clusters, sweep_k
    from .evaluation.tokens import chunk_text, load_wikitext2
    from .experiment.config import ExperimentConfig
    from .experiment.runner import run_experiment, run_models
    from .experiment.store import load_results
    from .model.circuits import ov_matrices, qk_matrices
    from .model.loading import load_model
    from .representations.mixing import Mixing
