"""qk_subspace: do attention heads share a low-dimensional weight subspace, and what breaks when
you force them into it? A toolkit on TransformerLens' HookedTransformer."""

from __future__ import annotations

from .circuits import (
    flat_to_layer_head,
    head_index,
    head_labels,
    layer_head_to_flat,
    parse_heads,
    qk_matrices,
)
from .injection import ParameterEdit, QKEdit, inject_qk, qk_injection_weights
from .loading import load_model
from .data import chunk_text, chunk_tokens, load_wikitext2, wikitext2_rows
from .evaluation import PerplexityResult, RatioCI, paired_ratio, perplexity
from .subspace import HeadPCA
from .sweeps import REPORT_K_GRID, evaluate_edit, sweep_k
from . import fastpath
from .fastpath import fast_path_enabled, set_fast_path_enabled

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
    "fastpath",
    "fast_path_enabled",
    "set_fast_path_enabled",
]
