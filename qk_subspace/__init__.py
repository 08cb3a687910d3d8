"""qk_subspace: do attention heads share a low-dimensional weight subspace, and what breaks when
you force them into it? A toolkit on TransformerLens' HookedTransformer."""

from __future__ import annotations

from . import fastpath
from .baselines import (
    marchenko_pastur_curve,
    random_subspace_sweep,
    random_subspace_variance,
    spectrum_nulls,
    summarize_random,
)
from .circuit_pca import CircuitEdit, CircuitPCA, circuit_factors, circuit_gram, materialize_circuits
from .circuits import (
    flat_to_layer_head,
    head_index,
    head_labels,
    layer_head_to_flat,
    parse_heads,
    qk_matrices,
)
from .clustering import REPORT_CLUSTER_GRID, HeadClustering, cluster_heads, sweep_clusters
from .data import chunk_text, chunk_tokens, load_wikitext2, wikitext2_rows
from .diagnostics import (
    attention_diagnostics,
    breaking_heads,
    diagnostic_batch,
    diagnostics_sweep,
    diagnostics_to_records,
    head_patterns,
    head_type_scores,
    repeated_random_tokens,
    show_patterns,
)
from .evaluation import PerplexityResult, RatioCI, paired_ratio, perplexity
from .experiment import (
    ExperimentConfig,
    ExperimentResult,
    GateResult,
    default_k_grid,
    gate_check,
    pca_map_rows,
    run_experiment,
    run_models,
    variance_summary,
)
from .fastpath import fast_path_enabled, set_fast_path_enabled
from .gauge import GaugeEdit, canonical_gauge, gauge_plan, random_gauge, random_gauge_matrices, rotary_pairs
from .gauge_report import GaugeStudy, gauge_study
from .grouped_pca import GramPCA, LayerwisePCA, matched_global_k, pca_parameter_count
from .importance import (
    circuit_gradient,
    component_importance,
    head_importance,
    head_importance_matrix,
    importance_order,
    k_reaching,
    rank_correlation,
)
from .injection import ParameterEdit, QKEdit, active_edits, inject_qk, qk_injection_weights, weights_version
from .loading import load_model
from .ov import (
    OVEdit,
    circuit_matrices,
    head_output_change,
    inject_circuit,
    inject_ov,
    ov_injection_weights,
    ov_matrices,
)
from .plots import (
    baselines_figure,
    gauge_figure,
    head_importance_figure,
    importance_overlay_figure,
    layerwise_figure,
)
from .report import REFERENCE_GPT2_SMALL, render_report
from .results import ConfigMismatchError, load_results
from .spaces import (
    SPACES,
    compare_layerwise_global,
    fit_space_pca,
    space_context,
    sweep_circuit_clusters,
    sweep_space,
)
from .subspace import HeadPCA
from .sweeps import REPORT_K_GRID, evaluate_edit, evaluate_parameter_edit, sweep_k

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model",
    "qk_matrices",
    "head_index",
    "head_labels",
    "flat_to_layer_head",
    "layer_head_to_flat",
    "parse_heads",
    "HeadPCA",
    "inject_qk",
    "QKEdit",
    "ParameterEdit",
    "qk_injection_weights",
    "load_wikitext2",
    "chunk_text",
    "chunk_tokens",
    "wikitext2_rows",
    "perplexity",
    "PerplexityResult",
    "paired_ratio",
    "RatioCI",
    "sweep_k",
    "evaluate_edit",
    "REPORT_K_GRID",
    "active_edits",
    "weights_version",
    "cluster_heads",
    "HeadClustering",
    "sweep_clusters",
    "REPORT_CLUSTER_GRID",
    "run_experiment",
    "run_models",
    "ExperimentConfig",
    "ExperimentResult",
    "GateResult",
    "gate_check",
    "variance_summary",
    "default_k_grid",
    "pca_map_rows",
    "ConfigMismatchError",
    "load_results",
    "REFERENCE_GPT2_SMALL",
    "render_report",
    "ov_matrices",
    "inject_ov",
    "OVEdit",
    "ov_injection_weights",
    "circuit_matrices",
    "inject_circuit",
    "head_output_change",
    "circuit_gradient",
    "component_importance",
    "importance_order",
    "rank_correlation",
    "head_importance",
    "head_importance_matrix",
    "k_reaching",
    "importance_overlay_figure",
    "head_importance_figure",
    "attention_diagnostics",
    "diagnostics_sweep",
    "diagnostics_to_records",
    "breaking_heads",
    "head_patterns",
    "head_type_scores",
    "repeated_random_tokens",
    "diagnostic_batch",
    "show_patterns",
    "evaluate_parameter_edit",
    "random_gauge",
    "canonical_gauge",
    "GaugeEdit",
    "gauge_plan",
    "random_gauge_matrices",
    "rotary_pairs",
    "GramPCA",
    "LayerwisePCA",
    "pca_parameter_count",
    "matched_global_k",
    "CircuitPCA",
    "CircuitEdit",
    "circuit_factors",
    "circuit_gram",
    "materialize_circuits",
    "SPACES",
    "sweep_space",
    "fit_space_pca",
    "space_context",
    "compare_layerwise_global",
    "random_subspace_sweep",
    "random_subspace_variance",
    "spectrum_nulls",
    "summarize_random",
    "marchenko_pastur_curve",
    "gauge_study",
    "GaugeStudy",
    "gauge_figure",
    "baselines_figure",
    "layerwise_figure",
    "fastpath",
    "fast_path_enabled",
    "set_fast_path_enabled",
    "sweep_circuit_clusters",
]
