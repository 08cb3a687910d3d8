"""The ``metadata`` section of a results file: what was run, on what, with which settings and versions.

Everything in it except the text file's path and the executor is part of the resume fingerprint
(:func:`qk_subspace.experiment.store.fingerprint`).
"""

from __future__ import annotations

import platform
from importlib import metadata as importlib_metadata
from typing import Any

from ..decomposition.clustering import KMEANS_N_INIT
from ..model import backends
from .context import RunContext

__all__ = ["build_metadata", "model_config", "package_versions"]

_PACKAGES = ("qk_subspace", "torch", "transformer-lens", "transformers", "scikit-learn", "numpy", "datasets")


def package_versions() -> dict[str, str]:
    """Versions of the packages that can change results (and Python's)."""
    out = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    from .. import __version__

    out["qk_subspace"] = __version__
    out["python"] = platform.python_version()
    return out


def model_config(model: Any) -> dict[str, Any]:
    """The model's shape and architecture, as recorded in the results."""
    c = model.cfg
    return {
        "model_name": c.model_name,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_key_value_heads": c.n_key_value_heads or c.n_heads,
        "d_model": c.d_model,
        "d_head": c.d_head,
        "n_ctx": c.n_ctx,
        "d_vocab": c.d_vocab,
        "normalization_type": c.normalization_type,
        "positional_embedding_type": c.positional_embedding_type,
    }


def build_metadata(ctx: RunContext) -> dict[str, Any]:
    """The metadata section of the run prepared in ``ctx``."""
    cfg, mdl = ctx.config, ctx.model
    s, st = cfg.sweeps, cfg.studies
    return {
        "model": ctx.name,
        "model_source": ctx.source,
        "model_config": model_config(mdl),
        "processing": getattr(mdl, "qk_subspace_processing", None),
        "protocol": ctx.protocol,
        "n_tokens": ctx.protocol["n_tokens"],
        "grids": {
            "K": ctx.ks,
            "cluster_k": ctx.cluster_ks,
            "cluster_k_dropped": ctx.dropped,
            "map_k": ctx.map_k,
            "K_layer": ctx.layer_ks,
            "K_global_matched": [ctx.matched[k] for k in ctx.layer_ks],
            "K_random": ctx.rand_ks,
        },
        "clustering": {"n_dims": ctx.n_dims, "kmeans_n_init": KMEANS_N_INIT, "n_dims_requested": s.n_dims},
        "seeds": {"kmeans": s.seed, "bootstrap": s.seed},
        "evaluation": {
            "batch_size": cfg.text.batch_size,
            "n_boot": s.n_boot,
            "confidence": 0.95,
            "device": str(mdl.W_U.device),
            "dtype": str(mdl.W_U.dtype).replace("torch.", ""),
        },
        "gate": {"K": s.gate_k, "threshold": s.gate_threshold},
        "circuit": cfg.circuits.circuit,
        "order": cfg.circuits.order,
        "diagnostics": ctx.side["diagnostics"],
        "importance": ctx.side["importance"],
        "space": st.space,
        "groupby": st.groupby,
        "baselines": None
        if not st.baselines
        else {"n_seeds": st.baseline_seeds, "seed_of_K": f"1000003 * {s.seed} + K", "within": "span"},
        "gauges": None
        if not st.gauges
        else {"n_gauges": st.gauges, "seed": s.seed + 1, "spaces": ["raw", "circuit"]},
        "representation": ctx.representation.name,
        "backend": backends.name_of(mdl),
        "package_versions": package_versions(),
        "executor": ctx.executor.describe(),
    }
