"""What the stages of one run share, prepared once: the model, the tokens, the fitted PCA, the grids.

:func:`prepare` loads the model (or takes a loaded one), cuts the evaluation tokens and the side
batches, reads the heads of the configured representation and fits the PCA inside its context, and
fixes every grid (K, cluster counts, per-layer K, random-subspace K) before anything is evaluated, so
a refused configuration fails before the results file is written.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..decomposition.clustering import HeadClustering
from ..decomposition.pca import HeadPCA, validate_k
from ..decomposition.storage import matched_global_k
from ..evaluation.perplexity import PerplexityResult, validate_tokens
from ..evaluation.sweeps import REPORT_K_GRID
from ..execution.base import Executor, SerialExecutor
from ..model import backends
from ..model.loading import load_model
from ..representations import Representation, get
from ..representations.heads import Heads
from .config import ExperimentConfig
from .inputs import evaluation_tokens, model_display_name, sha256_tokens, side_tokens

__all__ = ["BREAK_THRESHOLD", "RunContext", "default_k_grid", "prepare"]

_REPORT_N_HEADS = 144  # GPT-2 small, the model REPORT_K_GRID was written for
#: KL (nats) above which a head counts as broken in the breaking-heads table.
BREAK_THRESHOLD = 0.1
#: PCA coordinates k-means uses by default (the report's 20), clipped to the PCA's components.
DEFAULT_N_DIMS = 20
#: Fewer evaluation chunks than this make the bootstrap confidence intervals over chunks meaningless.
MIN_CHUNKS = 10


def default_k_grid(n_heads: int) -> list[int]:
    """The report's K grid scaled to ``n_heads`` (identical for GPT-2 small's 144 heads)."""
    scaled = {max(1, int(np.floor(k * n_heads / _REPORT_N_HEADS + 0.5))) for k in REPORT_K_GRID}
    return sorted(k for k in scaled if k <= n_heads)


@dataclass
class RunContext:
    """Everything the stages of a run share (see :func:`prepare`).

    Attributes:
        config: the run's options; model, name, source: the model, its file-name label and origin.
        tokens: ``[n_chunks, ctx]`` perplexity tokens; protocol: how they were made.
        diag_tokens, rank_tokens: the diagnostic batch and the importance-ranking tokens (or ``None``);
        side: their descriptions for the metadata (``diagnostics``, ``importance``).
        representation, heads, pca: the main representation, its heads and their PCA.
        layer_pca: the per-layer PCA (``groupby="layer"``), else ``None``.
        ks, cluster_ks, dropped, map_k, layer_ks, matched, rand_ks: the grids; n_dims: the PCA coordinates
            k-means uses (``--n-dims``; by default 20, clipped to the PCA's components).
        baseline: the unedited model's perplexity (set by the baseline stage).
        clusterings: k-means results per cluster count (set by the clustering stage).
        stage_s: seconds spent preparing, per step.
        executor: where the sweeps' points are evaluated (:mod:`qk_subspace.execution`).
    """

    config: ExperimentConfig
    model: Any
    name: str
    source: str
    tokens: torch.Tensor
    protocol: dict[str, Any]
    diag_tokens: torch.Tensor | None
    rank_tokens: torch.Tensor | None
    side: dict[str, Any]
    representation: Representation
    heads: Heads
    pca: HeadPCA
    layer_pca: HeadPCA | None
    ks: list[int]
    cluster_ks: list[int]
    dropped: list[int]
    map_k: int | None
    n_dims: int
    layer_ks: list[int]
    matched: dict[int, int]
    rand_ks: list[int]
    stage_s: dict[str, float] = field(default_factory=dict)
    executor: Executor = field(default_factory=SerialExecutor)
    baseline: PerplexityResult | None = None
    clusterings: dict[int, HeadClustering] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Heads in all (K = all)."""
        return int(self.pca.n_heads_)

    @property
    def glob_ks(self) -> list[int]:
        """The global K matched to each per-layer K, deduplicated."""
        return sorted(set(self.matched.values()))

    def sweep_options(self) -> dict[str, Any]:
        """Keyword options every sweep of the run shares."""
        c = self.config
        return {"batch_size": c.text.batch_size, "progress": c.run.progress, "n_boot": c.sweeps.n_boot}


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _load(model: Any, cfg: ExperimentConfig) -> tuple[Any, str, str]:
    if not isinstance(model, (str, os.PathLike)):
        return (
            model,
            getattr(model, "qk_subspace_source", str(model.cfg.model_name)),
            model_display_name(model),
        )
    _check_device(cfg.run.device)
    _check_backend(cfg.run.backend)
    try:
        mdl = load_model(model, device=cfg.run.device, dtype=_DTYPES[cfg.run.dtype], backend=cfg.run.backend)
    except (FileNotFoundError, ValueError, ConnectionError, TypeError) as exc:
        raise type(exc)(f"model (--model) {str(model)!r}: {exc}") from None
    return mdl, str(getattr(mdl, "qk_subspace_source", model)), model_display_name(model)


def _check_backend(backend: str) -> None:
    """Refuse a backend this TransformerLens does not have, naming the option (before any loading)."""
    try:
        backends.resolve(backend)
    except ValueError as exc:
        raise ValueError(f"backend (--backend) {exc}") from None


def _check_device(device: str | None) -> None:
    """Refuse a device this torch build cannot use, naming the option (before any loading)."""
    if device is None:
        return
    kind = str(device).split(":")[0]
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind in available and not available[kind]:
        raise ValueError(
            f"device (--device) {device!r} is not available: this torch build ({torch.__version__}) has no "
            f"{kind.upper()} device here; use --device cpu (default: TransformerLens' choice)"
        )


def _inputs(
    mdl: Any,
    cfg: ExperimentConfig,
    tokens: torch.Tensor | None,
    diag: torch.Tensor | None,
    rank: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """Tokens, protocol, diagnostic batch, ranking tokens and the side batches' descriptions."""
    caller_tokens = tokens is not None
    if tokens is not None:
        protocol: dict[str, Any] = {
            "text": "tokens given by the caller",
            "route": "tokens",
            "ctx": int(tokens.shape[-1]),
        }
    else:
        tokens, protocol = evaluation_tokens(mdl, cfg)
    protocol.update(
        n_chunks=int(tokens.shape[0]),
        n_tokens=int(tokens.numel()),
        n_predicted_tokens=int(tokens.shape[0] * (tokens.shape[1] - 1)),
        tokens_sha256=sha256_tokens(tokens),
    )
    c = cfg.circuits
    want_diag, want_rank = c.diagnostics and diag is None, c.order == "importance" and rank is None
    side_info: dict[str, Any] = {}
    if want_diag or want_rank:
        if caller_tokens:
            raise ValueError(
                "with tokens=..., also pass diag_tokens=... (diagnostics) and rank_tokens=... (order='importance'): "
                "they must be tokens separate from the perplexity tokens"
            )
        d, r, side_info = side_tokens(mdl, cfg, int(tokens.numel()), int(tokens.shape[1]))
        diag, rank = (d if want_diag else diag), (r if want_rank else rank)
    for what, batch in (("diag_tokens (--diag-seqs x --diag-ctx)", diag), ("rank_tokens", rank)):
        if batch is not None:  # fail before any evaluation, not after the baseline
            try:
                validate_tokens(mdl, batch)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{what}: {exc}") from None
    source = "text after the perplexity tokens" if side_info else "tokens given by the caller"
    side: dict[str, Any] = {"diagnostics": None, "importance": None}
    if c.diagnostics and diag is not None:
        side["diagnostics"] = {
            "n_seqs": int(diag.shape[0]),
            "ctx": int(diag.shape[1]),
            "head_scores": c.head_scores,
            "tokens_sha256": sha256_tokens(diag),
            "source": source,
            "offset": side_info.get("offset"),
            "breaking_threshold": BREAK_THRESHOLD,
        }
    if c.order == "importance" and rank is not None:
        side["importance"] = {
            "method": c.importance_method,
            "n_chunks": int(rank.shape[0]),
            "n_tokens": int(rank.numel()),
            "tokens_sha256": sha256_tokens(rank),
            "source": source + (" and the diagnostic batch" if side_info and c.diagnostics else ""),
        }
    return tokens, protocol, diag, rank, side


def prepare(
    model: Any,
    cfg: ExperimentConfig,
    tokens: torch.Tensor | None = None,
    diag_tokens: torch.Tensor | None = None,
    rank_tokens: torch.Tensor | None = None,
) -> RunContext:
    """Load, tokenise, fit and fix the grids (see the module docstring)."""
    stage_s: dict[str, float] = {}
    t0 = time.perf_counter()
    mdl, source, name = _load(model, cfg)
    stage_s["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_ctx = int(mdl.cfg.n_ctx)
    if cfg.text.ctx is not None and cfg.text.ctx > n_ctx:
        raise ValueError(f"ctx (--ctx) must be at most the model's context n_ctx={n_ctx}, got {cfg.text.ctx}")
    toks, protocol, diag, rank, side = _inputs(mdl, cfg, tokens, diag_tokens, rank_tokens)
    if protocol["n_chunks"] < MIN_CHUNKS:
        warnings.warn(
            f"only {protocol['n_chunks']} evaluation chunk(s): the bootstrap confidence intervals over chunks "
            f"need at least {MIN_CHUNKS} to mean anything; give more tokens (--n-tokens) or shorter chunks (--ctx)",
            RuntimeWarning,
            stacklevel=3,
        )
    stage_s["tokens"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = get(cfg.representation)
    with rep.context(mdl):
        heads = rep.heads(mdl)
        pca = HeadPCA().fit(heads)
        layer_pca = HeadPCA(groupby="layer").fit(heads) if cfg.studies.groupby == "layer" else None
    stage_s["pca"] = time.perf_counter() - t0
    n, s = pca.n_heads_, cfg.sweeps
    # grids: K = all (exactness check) and the gate K are always evaluated
    base_ks = list(s.ks) if s.ks is not None else default_k_grid(n)
    ks = sorted(
        {validate_k(k, n, name="ks (--ks)") for k in base_ks} | {n} | ({s.gate_k} if s.gate_k <= n else set())
    )
    cluster_ks = sorted({int(k) for k in s.cluster_ks if k < n})
    dropped = sorted({int(k) for k in s.cluster_ks if k >= n})
    n_dims = s.n_dims if s.n_dims is not None else min(DEFAULT_N_DIMS, pca.n_components_)
    if cluster_ks and not 1 <= n_dims <= pca.n_components_:
        raise ValueError(
            f"n_dims (--n-dims) must be in [1, {pca.n_components_}] (the PCA's number of components for this "
            f"model), got {n_dims}"
        )
    m_layer = int(mdl.cfg.n_heads)
    layer_ks = sorted({min(k, m_layer) for k in ks} | {m_layer}) if layer_pca is not None else []
    matched = {k: matched_global_k(k, heads.feature_dim, n, int(mdl.cfg.n_layers), max_k=n) for k in layer_ks}
    rand_ks = [k for k in ks if 0 < k < pca.n_nonzero_components_] if cfg.studies.baselines else []
    map_k = s.map_k if s.map_k is not None else (cluster_ks[0] if cluster_ks else None)
    if map_k is not None and map_k not in cluster_ks:
        raise ValueError(
            f"map_k (--map-k) must be one of the evaluated cluster counts {cluster_ks}, got {map_k}"
        )
    return RunContext(
        config=cfg, model=mdl, name=name, source=source, tokens=toks, protocol=protocol, diag_tokens=diag,
        rank_tokens=rank, side=side, representation=rep, heads=heads, pca=pca, layer_pca=layer_pca, ks=ks,
        cluster_ks=cluster_ks, dropped=dropped, map_k=map_k, n_dims=n_dims, layer_ks=layer_ks, matched=matched,
        rand_ks=rand_ks, stage_s=stage_s,
    )  # fmt: skip
