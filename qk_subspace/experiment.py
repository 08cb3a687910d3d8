"""The whole experiment of the seed report (6A variance, 6B K sweep, 6C clustering, 2D map, gate).

:func:`run_experiment` only composes the library: ``load_model`` -> evaluation tokens
(``load_wikitext2`` / ``chunk_text``) -> ``circuit_matrices`` (QK or OV) -> ``HeadPCA`` -> ``sweep_k``
(optionally with attention diagnostics, and importance-ordered via ``component_importance``) ->
``sweep_clusters`` -> figures (:mod:`qk_subspace.plots`) -> ``report.md``
(:mod:`qk_subspace.report`). Results go to ``<out>/exp6_<model>.json``, rewritten atomically after
every finished evaluation point (:mod:`qk_subspace.results`), so an interrupted run can continue
with ``resume=True`` (CLI: ``--resume``).

Options live in :class:`ExperimentConfig`; to add one, add a field there (and, for the CLI, an
argument with the same ``dest`` in :func:`qk_subspace.cli.add_run_arguments`): the CLI copies every
argument whose name is a config field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from transformer_lens import HookedTransformer

from .baselines import random_subspace_sweep, spectrum_nulls, summarize_random
from .circuits import head_index, head_labels
from .clustering import KMEANS_N_INIT, REPORT_CLUSTER_GRID, HeadClustering, cluster_heads, sweep_clusters
from .data import chunk_text, chunk_tokens, load_wikitext2
from .diagnostics import diagnostic_batch
from .evaluation import PerplexityResult, perplexity, validate_tokens
from .gauge_report import gauge_study
from .grouped_pca import matched_global_k
from .importance import component_importance, importance_order
from .loading import load_model
from .ov import circuit_matrices, head_output_change, inject_circuit
from .results import ResultsStore, jsonable
from .spaces import SPACES, fit_space_pca, space_context, sweep_circuit_clusters, sweep_space
from .subspace import HeadPCA, validate_k
from .sweeps import K_ALL_TOLERANCE, REPORT_K_GRID, sweep_k

__all__ = [
    "VARIANCE_THRESHOLDS",
    "ExperimentConfig",
    "ExperimentResult",
    "GateResult",
    "default_k_grid",
    "evaluation_tokens",
    "gate_check",
    "model_display_name",
    "pca_map_rows",
    "run_experiment",
    "run_models",
    "side_tokens",
    "variance_summary",
]

#: Cumulative-variance thresholds of the report's 6A table.
VARIANCE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)
_REPORT_N_HEADS = 144  # GPT-2 small, the model REPORT_K_GRID was written for
_BREAK_THRESHOLD = 0.1  # KL (nats) above which a head counts as broken in the breaking-heads table
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class ExperimentConfig:
    """Every option of a run (all have defaults reproducing the seed report's protocol).

    Attributes:
        text_file: local text; ``None`` = WikiText-2 test split via ``datasets``.
        text_format: ``"auto"`` (a ``wiki.*.raw`` file is WikiText-2, anything else plain text),
            ``"wikitext"`` (rows as in Hugging Face, joined with blank lines) or ``"plain"``
            (the file's text as is, via :func:`qk_subspace.chunk_text`).
        split: WikiText-2 split for the ``datasets`` route.
        n_tokens: keep the first ``n_tokens`` tokens (``None``: all); 200,000 -> 195 x 1024.
        ctx: chunk length; ``None`` = ``min(1024, model n_ctx)``.
        batch_size: chunks per forward pass.
        ks: K grid; ``None`` = the report's grid scaled to the model's number of heads. The
            number of heads (K = all, the exactness check) and ``gate_k`` are always added.
        cluster_ks: cluster counts k; values ``>= n_heads`` are dropped.
        n_dims: PCA coordinates used by k-means.
        map_k: cluster count whose assignment colours the 2D map (``None``: smallest evaluated k).
        seed: k-means ``random_state`` and bootstrap seed.
        n_boot: bootstrap resamples for the ratio confidence intervals.
        device, dtype: where and in which dtype the model is loaded.
        gate_k, gate_threshold: the gate rule (ratio at K=``gate_k`` must be <= ``gate_threshold``).
        resume: continue the run in the output directory (configuration must match).
        overwrite: replace an existing results file of the same model.
        png: also write PNG figures (needs Chromium).
        progress: show tqdm bars.
        circuit: ``"qk"`` (``W_QK``, injected through ``W_Q``) or ``"ov"`` (head-space OV circuits,
            injected through ``W_V``): PCA, K sweep and clustering all run on this circuit.
        diagnostics: per-head attention-pattern metrics per K (``attention_diagnostics`` section)
            on a small diagnostic batch of ``diag_seqs x diag_ctx`` tokens taken from the text
            right after the perplexity tokens; ``head_scores`` adds previous-token /
            duplicate-token / induction scores before and after.
        order: ``"variance"`` (the report's protocol) or ``"importance"``: additionally rank the
            components with ``importance_method`` (``"drop_one"`` or ``"gradient"``) on
            ``importance_tokens`` tokens not used by the sweep (after the diagnostic batch) and
            sweep K over the importance order too (``perplexity_vs_k_importance``).
        space: PCA space of the whole QK pipeline (variance, K sweep, clustering, map, gate):
            ``"raw"`` (the report's ``W_Q^T W_K``), ``"canonical"`` (the same inside
            :func:`~qk_subspace.canonical_gauge`) or ``"circuit"`` (gauge-invariant
            ``C_h = W_Q W_K^T``, :class:`~qk_subspace.CircuitPCA`, injected through ``W_Q`` by least
            squares, residual recorded per K). QK only; not with ``order="importance"`` or
            ``diagnostics`` unless ``"raw"``.
        groupby: ``"layer"`` adds a ``layerwise`` section: one PCA per layer (same K in every layer,
            K clipped to the heads per layer, which is always added) and the global PCA at the largest
            K with no more parameters (:func:`~qk_subspace.matched_global_k`); the main pipeline
            stays global.
        baselines: null baselines of the main PCA: spectrum nulls (``spectrum_nulls``, ``baseline_seeds``
            seeds) and random K-dim subspaces (``random_subspace_sweep``, ``baseline_seeds`` seeds per
            K with ``0 < K < rank``; seed of K = ``1_000_003 * seed + K``).
        gauges: ``N > 0`` adds ``gauge_study`` (raw and circuit curves under ``N`` random gauges;
            ``(N + 1) * (1 + 2 len(ks))`` evaluations).
    """

    text_file: str | None = None
    text_format: str = "auto"
    split: str = "test"
    n_tokens: int | None = 200_000
    ctx: int | None = None
    batch_size: int = 8
    ks: tuple[int, ...] | None = None
    cluster_ks: tuple[int, ...] = REPORT_CLUSTER_GRID
    n_dims: int = 20
    map_k: int | None = None
    seed: int = 0
    n_boot: int = 2000
    device: str | None = None
    dtype: str = "float32"
    gate_k: int = 10
    gate_threshold: float = 1.1
    resume: bool = False
    overwrite: bool = False
    png: bool = True
    progress: bool = True
    circuit: Literal["qk", "ov"] = "qk"
    diagnostics: bool = False
    diag_seqs: int = 8
    diag_ctx: int = 128
    head_scores: bool = True
    order: str = "variance"
    importance_method: Literal["drop_one", "gradient"] = "drop_one"
    importance_tokens: int = 32_768
    space: Literal["raw", "canonical", "circuit"] = "raw"
    groupby: str | None = None
    baselines: bool = False
    baseline_seeds: int = 3
    gauges: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("circuit", ("qk", "ov")),
            ("order", ("variance", "importance")),
            ("importance_method", ("drop_one", "gradient")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name, low in (("diag_seqs", 1), ("diag_ctx", 2), ("importance_tokens", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self._check_space_options()
        if self.text_format not in ("auto", "wikitext", "plain"):
            raise ValueError(f"text_format must be 'auto', 'wikitext' or 'plain', got {self.text_format!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("batch_size", "n_boot", "n_dims"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.gate_threshold, (int, float)) and self.gate_threshold > 0):
            raise ValueError(f"gate_threshold must be a positive number, got {self.gate_threshold!r}")
        if self.ks is not None:
            self.ks = tuple(self.ks)
            if not self.ks:
                raise ValueError("ks must contain at least one K (or be None for the default grid)")
        self.cluster_ks = tuple(self.cluster_ks)
        for k in self.cluster_ks:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"cluster_ks: cluster counts must be integers >= 1, got {k!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")

    def _check_space_options(self) -> None:
        """Validate ``space``/``groupby``/``baselines``/``gauges`` and refuse combinations that make no sense."""
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {list(SPACES)}, got {self.space!r}")
        if self.groupby not in (None, "layer"):
            raise ValueError(f"groupby must be None or 'layer', got {self.groupby!r}")
        for name, low in (("baseline_seeds", 1), ("gauges", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        qk_only = [
            flag
            for flag, on in (
                (f"--space {self.space}", self.space != "raw"),
                ("--groupby layer", self.groupby == "layer"),
                ("--baselines", self.baselines),
                (f"--gauges {self.gauges}", self.gauges > 0),
            )
            if on
        ]
        if qk_only and self.circuit != "qk":
            raise ValueError(
                f"{', '.join(qk_only)} analyse QK circuits (W_Q, W_K) and cannot be combined with "
                f"--circuit {self.circuit}; drop them or use --circuit qk"
            )
        if self.space != "raw":
            for flag, on in (
                ("--order importance", self.order == "importance"),
                ("--diagnostics", self.diagnostics),
            ):
                if on:
                    raise ValueError(
                        f"{flag} works on the raw W_QK PCA and cannot be combined with "
                        f"--space {self.space}; use --space raw (default) or drop {flag}"
                    )

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------- pieces
def default_k_grid(n_heads: int) -> list[int]:
    """The report's K grid scaled to ``n_heads`` (identical for GPT-2 small's 144 heads)."""
    scaled = {max(1, int(np.floor(k * n_heads / _REPORT_N_HEADS + 0.5))) for k in REPORT_K_GRID}
    return sorted(k for k in scaled if k <= n_heads)


def variance_summary(
    pca: Any, thresholds: Sequence[float] = VARIANCE_THRESHOLDS, top: int = 3
) -> dict[str, Any]:
    """The report's 6A numbers (a fitted ``HeadPCA`` or global ``CircuitPCA``): components per threshold, top ratios."""
    n = pca.n_heads_
    cum = pca.cumulative_variance_
    return {
        "n_heads": n,
        "n_features": int(np.prod(getattr(pca, "matrix_shape_", None) or (pca.d_model_, pca.d_model_))),
        "n_components": pca.n_components_,
        "n_nonzero_components": pca.n_nonzero_components_,
        "thresholds": [
            {
                "threshold": float(t),
                "K": pca.n_components_for(t),
                "fraction_of_heads": pca.n_components_for(t) / n,
            }
            for t in thresholds
        ],
        "top_ratios": [float(r) for r in pca.explained_variance_ratio_[:top]],
        "top_cumulative": float(cum[min(top, len(cum)) - 1]),
        "pc12_cumulative": float(cum[min(2, len(cum)) - 1]),
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        "cumulative_variance": cum.tolist(),
    }


@dataclass
class GateResult:
    """Outcome of the gate rule: ``passed`` iff the ratio at ``K`` is ``<= threshold``.

    ``passed`` is ``None`` (and ``ratio`` ``None``) when K was not evaluated.
    """

    K: int
    threshold: float
    ratio: float | None
    passed: bool | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gate_check(rows: Any, K: int = 10, threshold: float = 1.1) -> GateResult:
    """Apply the report's gate (GPT-2 medium ran only if K=10 stayed within 1.1x of baseline).

    Args:
        rows: the K sweep, as a DataFrame (``qs.sweep_k``), a list of row dicts, or a results dict.
        K: the K whose ratio is tested.
        threshold: largest acceptable perplexity ratio.
    """
    if isinstance(rows, Mapping):
        rows = rows.get("perplexity_vs_k", [])
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    hits = [r for r in records if int(r["K"]) == int(K)]
    if not hits:
        return GateResult(int(K), float(threshold), None, None, f"K={K} was not evaluated; gate not applied")
    ratio = float(hits[-1]["ratio"])
    passed = ratio <= threshold
    verdict = "within" if passed else "not within"
    return GateResult(
        int(K), float(threshold), ratio, passed, f"ratio at K={K} is {ratio:.3g}x, {verdict} {threshold}x"
    )


def pca_map_rows(pca: HeadPCA, clustering: HeadClustering | None = None) -> list[dict[str, Any]]:
    """Every head's first two PCA coordinates with its layer, head, label and (optional) cluster."""
    n_layers, n_heads = pca.head_shape_[0], int(np.prod(pca.head_shape_[1:]))
    labels = head_labels(n_layers, n_heads)
    clusters = (
        clustering.assignments.reshape(-1).tolist() if clustering is not None else [None] * pca.n_heads_
    )
    c = pca.coefficients_
    return [
        {
            "label": labels[i],
            "layer": layer,
            "head": head,
            "pc1": float(c[i, 0]),
            "pc2": float(c[i, 1]) if c.shape[1] > 1 else 0.0,
            "cluster": clusters[i],
        }
        for i, (layer, head) in enumerate(head_index(n_layers, n_heads))
    ]


def model_display_name(model: str | os.PathLike | HookedTransformer) -> str:
    """Name used in file names: a local directory's basename, an official name as given."""
    if isinstance(model, HookedTransformer):
        name = str(model.cfg.model_name)
    else:
        p = Path(model).expanduser()
        name = p.resolve().name if p.is_dir() else str(model)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _package_versions() -> dict[str, str]:
    out = {}
    for pkg in (
        "qk_subspace",
        "torch",
        "transformer-lens",
        "transformers",
        "scikit-learn",
        "numpy",
        "datasets",
    ):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    from . import __version__

    out["qk_subspace"] = __version__
    out["python"] = platform.python_version()
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_tokens(tokens: torch.Tensor) -> str:
    arr = tokens.detach().cpu().to(torch.int64).numpy()
    return hashlib.sha256(repr(tuple(arr.shape)).encode() + arr.tobytes()).hexdigest()


def evaluation_tokens(
    model: HookedTransformer, config: ExperimentConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The evaluation tokens ``[n_chunks, ctx]`` of ``config`` and a description of the protocol."""
    ctx = config.ctx if config.ctx is not None else min(1024, int(model.cfg.n_ctx))
    if model.tokenizer is None:
        raise ValueError(
            "the model has no tokenizer; give run_experiment tokens=... or a checkpoint with tokenizer files"
        )
    protocol: dict[str, Any] = {"ctx": ctx, "n_tokens_requested": config.n_tokens, "bos": False}
    if config.text_file is None:
        tokens = load_wikitext2(model.tokenizer, split=config.split, n_tokens=config.n_tokens, ctx=ctx)
        protocol.update(text="wikitext-2-raw-v1", route="datasets", split=config.split, joined_with="\n\n")
        return tokens, protocol
    path = Path(config.text_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text_file {str(path)!r} does not exist")
    wikitext = config.text_format == "wikitext" or (
        config.text_format == "auto" and re.fullmatch(r"wiki\..+\.raw", path.name) is not None
    )
    if wikitext:
        tokens = load_wikitext2(model.tokenizer, n_tokens=config.n_tokens, ctx=ctx, text_file=path)
        protocol.update(text="wikitext-2-raw-v1", route="file", joined_with="\n\n")
    else:
        tokens = chunk_text(model.tokenizer, path.read_text(encoding="utf-8"), config.n_tokens, ctx)
        protocol.update(text=path.name, route="plain text file")
    protocol.update(text_file=str(config.text_file), text_sha256=_sha256_file(path))
    return tokens, protocol


def side_tokens(
    model: HookedTransformer, config: ExperimentConfig, n_used: int, ctx: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """The diagnostic batch and the importance-ranking tokens, cut from the config's text *after* the
    first ``n_used`` tokens (those of the perplexity sweep), so neither overlaps the sweep.

    Returns:
        ``(diag_tokens [diag_seqs, diag_ctx] or None, rank_tokens [n, ctx] or None, description)``:
        the diagnostic batch comes first in the remaining stream, the ranking tokens
        (``importance_tokens``, cut to whole chunks of ``ctx``) right after it. ``None`` when the
        config does not need them (``diagnostics`` off / ``order="variance"``).
    """
    want_diag, want_rank = config.diagnostics, config.order == "importance"
    if not (want_diag or want_rank):
        return None, None, {}
    full, _ = evaluation_tokens(model, config.replace(n_tokens=None, ctx=2))
    stream = full.flatten()[n_used:]
    diag = rank = None
    info: dict[str, Any] = {"offset": n_used, "available": len(stream)}
    hint = "lower --n-tokens (the perplexity tokens) or use a longer text"
    if want_diag:
        need = config.diag_seqs * config.diag_ctx
        if len(stream) < need:
            raise ValueError(
                f"diagnostics need {config.diag_seqs} x {config.diag_ctx} = {need} tokens after the {n_used} "
                f"perplexity tokens; the text has {len(stream)} more: {hint}, or lower --diag-seqs/--diag-ctx"
            )
        diag = diagnostic_batch(stream, config.diag_seqs, config.diag_ctx)
    rest = stream[0 if diag is None else diag.numel() :]
    if want_rank:
        if len(rest) < max(config.importance_tokens, ctx):
            raise ValueError(
                f"importance ranking needs importance_tokens={config.importance_tokens} tokens (at least one "
                f"chunk of {ctx}) not used by the sweep; the text has {len(rest)} left: {hint}, "
                "or lower --importance-tokens"
            )
        rank = chunk_tokens(rest, config.importance_tokens, ctx)
    return diag, rank, info


def _model_config(model: HookedTransformer) -> dict[str, Any]:
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------- the run
@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced.

    Attributes:
        results: the results document (as written to ``path``).
        path: the results JSON.
        figures: plotly figures by name (``exp6a_cumvar_<model>``, ...), for notebooks.
        figure_files: ``{name: {"html": path, "png": path}}`` of the files written.
        report_path: ``report.md``.
    """

    results: dict[str, Any]
    path: Path
    figures: dict[str, go.Figure] = field(default_factory=dict, repr=False)
    figure_files: dict[str, dict[str, str]] = field(default_factory=dict)
    report_path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.results["metadata"]["model"])

    @property
    def gate(self) -> GateResult:
        return GateResult(**self.results["gate"])

    def tables(self) -> dict[str, pd.DataFrame]:
        """The report's tables as DataFrames: ``variance``, ``perplexity_vs_k``, ``clustering``."""
        from .report import result_tables

        return result_tables(self.results)


def run_experiment(
    model: str | os.PathLike | HookedTransformer,
    out_dir: str | os.PathLike = "results",
    config: ExperimentConfig | None = None,
    *,
    tokens: torch.Tensor | None = None,
    write_report: bool = True,
    diag_tokens: torch.Tensor | None = None,
    rank_tokens: torch.Tensor | None = None,
    **overrides: Any,
) -> ExperimentResult:
    """Run 6A/6B/6C + the 2D map + the gate for one model and write everything to ``out_dir``.

    Args:
        model: an official name (``"gpt2"``), a local checkpoint directory, or a loaded model.
        out_dir: output directory (created).
        config: options (:class:`ExperimentConfig`); keyword ``overrides`` replace its fields.
        tokens: evaluation tokens ``[n_chunks, ctx]`` to use instead of the config's text.
        write_report: also write ``<out_dir>/report.md`` for this model alone.
        diag_tokens: ``[n_seqs, pos]`` diagnostic batch (``diagnostics``) instead of the text after
            the perplexity tokens (required with ``tokens``).
        rank_tokens: ``[n, ctx]`` importance-ranking tokens (``order="importance"``) instead of the
            text after the diagnostic batch (required with ``tokens``).

    Optional sections: ``attention_diagnostics`` (``diagnostics``: per-head rows per K, with the
    relative change of every head's output ``output_change_z`` / ``output_change_write`` from
    :func:`qk_subspace.head_output_change`), ``importance`` and ``perplexity_vs_k_importance``
    (``order="importance"``), each written point by point like the K sweep, so ``resume`` skips
    finished points and keeps their data.

    Writes ``exp6_<model>.json`` (sections ``metadata``, ``variance``, ``baseline``,
    ``perplexity_vs_k``, ``clustering``, ``pca_map``, ``checks``, ``gate``; clock times only in
    ``timings``), the four figures as HTML (+ PNG) and ``report.md``.

    Raises:
        FileExistsError: results for this model exist and neither ``resume`` nor ``overwrite`` is set.
        qk_subspace.results.ConfigMismatchError: ``resume`` on a different configuration.
    """
    cfg = (config or ExperimentConfig()).replace(**overrides)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(
            f"out_dir {str(out)!r} cannot be created ({exc.strerror or exc}); it must be a writable directory"
        ) from exc
    if not os.access(out, os.W_OK):
        raise PermissionError(f"out_dir {str(out)!r} is not writable; it must be a writable directory")
    t_run = time.perf_counter()
    started = _now()
    stage_s: dict[str, float] = {}

    t0 = time.perf_counter()
    if isinstance(model, HookedTransformer):
        mdl, source = model, getattr(model, "qk_subspace_source", str(model.cfg.model_name))
    else:
        mdl = load_model(model, device=cfg.device, dtype=_DTYPES[cfg.dtype])
        source = str(getattr(mdl, "qk_subspace_source", model))
    name = model_display_name(model)
    stage_s["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
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
        tokens_sha256=_sha256_tokens(tokens),
    )
    want_diag = cfg.diagnostics and diag_tokens is None
    want_rank = cfg.order == "importance" and rank_tokens is None
    side_info: dict[str, Any] = {}
    if want_diag or want_rank:
        if caller_tokens:
            raise ValueError(
                "with tokens=..., also pass diag_tokens=... (diagnostics) and rank_tokens=... (order='importance'): "
                "they must be tokens separate from the perplexity tokens"
            )
        d, r, side_info = side_tokens(mdl, cfg, int(tokens.numel()), int(tokens.shape[1]))
        diag_tokens = d if want_diag else diag_tokens
        rank_tokens = r if want_rank else rank_tokens
    for what, side in (("diag_tokens (--diag-seqs x --diag-ctx)", diag_tokens), ("rank_tokens", rank_tokens)):
        if side is not None:  # fail before any evaluation, not after the baseline
            try:
                validate_tokens(mdl, side)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{what}: {exc}") from None
    source = "text after the perplexity tokens" if side_info else "tokens given by the caller"
    diag_meta = (
        None
        if not cfg.diagnostics or diag_tokens is None
        else {
            "n_seqs": int(diag_tokens.shape[0]),
            "ctx": int(diag_tokens.shape[1]),
            "head_scores": cfg.head_scores,
            "tokens_sha256": _sha256_tokens(diag_tokens),
            "source": source,
            "offset": side_info.get("offset"),
            "breaking_threshold": _BREAK_THRESHOLD,
        }
    )
    imp_meta = (
        None
        if cfg.order != "importance" or rank_tokens is None
        else {
            "method": cfg.importance_method,
            "n_chunks": int(rank_tokens.shape[0]),
            "n_tokens": int(rank_tokens.numel()),
            "tokens_sha256": _sha256_tokens(rank_tokens),
            "source": source + (" and the diagnostic batch" if side_info and cfg.diagnostics else ""),
        }
    )
    stage_s["tokens"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pca: Any
    layer_pca: Any = None
    if cfg.space == "raw":
        W = circuit_matrices(mdl, cfg.circuit)  # type: ignore[arg-type]  # [n_layers, n_heads, d_head, d_head] float64
        pca = HeadPCA().fit(W)
    else:  # canonical: HeadPCA of W_QK in the canonical gauge; circuit: CircuitPCA (no W materialised)
        with space_context(mdl, cfg.space):  # type: ignore[arg-type]
            pca = fit_space_pca(mdl, cfg.space)  # type: ignore[arg-type]
            W = circuit_matrices(mdl, "qk") if cfg.space == "canonical" else None  # type: ignore[assignment]
    if cfg.groupby == "layer":
        with space_context(mdl, cfg.space):  # type: ignore[arg-type]
            layer_pca = fit_space_pca(mdl, cfg.space, "layer")  # type: ignore[arg-type]
    n = pca.n_heads_
    stage_s["pca"] = time.perf_counter() - t0

    # grids: K = all (exactness check) and the gate K are always evaluated
    base_ks = list(cfg.ks) if cfg.ks is not None else default_k_grid(n)
    ks = sorted(
        {validate_k(k, n, name="ks") for k in base_ks} | {n} | ({cfg.gate_k} if cfg.gate_k <= n else set())
    )
    cluster_ks = sorted({int(k) for k in cfg.cluster_ks if k < n})
    dropped = sorted({int(k) for k in cfg.cluster_ks if k >= n})
    if cluster_ks and not 1 <= cfg.n_dims <= pca.n_components_:
        raise ValueError(
            f"n_dims must be in [1, {pca.n_components_}] (the PCA's number of components for this model), "
            f"got {cfg.n_dims}"
        )
    m_layer, D = int(mdl.cfg.n_heads), (mdl.cfg.d_model**2 if cfg.space == "circuit" else mdl.cfg.d_head**2)
    layer_ks = sorted({min(k, m_layer) for k in ks} | {m_layer}) if cfg.groupby == "layer" else []
    matched = {k: matched_global_k(k, D, n, int(mdl.cfg.n_layers), max_k=n) for k in layer_ks}
    rand_ks = [k for k in ks if 0 < k < pca.n_nonzero_components_] if cfg.baselines else []
    map_k = cfg.map_k if cfg.map_k is not None else (cluster_ks[0] if cluster_ks else None)
    if map_k is not None and map_k not in cluster_ks:
        raise ValueError(f"map_k must be one of the evaluated cluster counts {cluster_ks}, got {map_k}")

    metadata = {
        "model": name,
        "model_source": source,
        "model_config": _model_config(mdl),
        "processing": getattr(mdl, "qk_subspace_processing", None),
        "protocol": protocol,
        "n_tokens": protocol["n_tokens"],
        "grids": {
            "K": ks,
            "cluster_k": cluster_ks,
            "cluster_k_dropped": dropped,
            "map_k": map_k,
            "K_layer": layer_ks,
            "K_global_matched": [matched[k] for k in layer_ks],
            "K_random": rand_ks,
        },
        "clustering": {"n_dims": cfg.n_dims, "kmeans_n_init": KMEANS_N_INIT},
        "seeds": {"kmeans": cfg.seed, "bootstrap": cfg.seed},
        "evaluation": {
            "batch_size": cfg.batch_size,
            "n_boot": cfg.n_boot,
            "confidence": 0.95,
            "device": str(mdl.W_U.device),
            "dtype": str(mdl.W_U.dtype).replace("torch.", ""),
        },
        "gate": {"K": cfg.gate_k, "threshold": cfg.gate_threshold},
        "circuit": cfg.circuit,
        "order": cfg.order,
        "diagnostics": diag_meta,
        "importance": imp_meta,
        "space": cfg.space,
        "groupby": cfg.groupby,
        "baselines": None
        if not cfg.baselines
        else {
            "n_seeds": cfg.baseline_seeds,
            "seed_of_K": f"1000003 * {cfg.seed} + K",
            "within": "span",
        },
        "gauges": None
        if not cfg.gauges
        else {"n_gauges": cfg.gauges, "seed": cfg.seed + 1, "spaces": ["raw", "circuit"]},
        "package_versions": _package_versions(),
    }
    store = ResultsStore.open(out / f"exp6_{name}.json", metadata, resume=cfg.resume, overwrite=cfg.overwrite)
    data = store.payload
    timings = data.get("timings") or {"runs": [], "points_s": {}}
    run_entry: dict[str, Any] = {
        "started": started,
        "resumed": store.resumed,
        "evaluated": [],
        "stages_s": stage_s,
    }
    timings["runs"].append(run_entry)
    data["timings"] = timings

    clusterings = {k: cluster_heads(pca, k, n_dims=cfg.n_dims, seed=cfg.seed) for k in cluster_ks}
    data["variance"] = variance_summary(pca)
    old_cl = data.get("clustering") or {}
    data["clustering"] = {
        "n_dims": cfg.n_dims,
        "seed": cfg.seed,
        "kmeans_n_init": KMEANS_N_INIT,
        "dropped_k": dropped,
        "rows": old_cl.get("rows", []),
        "assignments": {str(k): c.assignments.tolist() for k, c in clusterings.items()},
        "representatives": {str(k): c.representative_labels() for k, c in clusterings.items()},
    }
    data["pca_map"] = pca_map_rows(pca, clusterings.get(map_k) if map_k is not None else None)
    data.setdefault("perplexity_vs_k", [])
    by_importance = cfg.order == "importance"
    if cfg.diagnostics:
        data.setdefault("attention_diagnostics", {"rows": []})
        data["attention_diagnostics"]["options"] = diag_meta
    if by_importance:
        data.setdefault("perplexity_vs_k_importance", [])
    glob_ks = sorted(set(matched.values()))
    if cfg.groupby == "layer":
        lw = data.setdefault("layerwise", {"per_layer": [], "global": []})
        lw["parameter_count"] = (
            f"numbers stored, D = {D} per head matrix, n = {n} heads, L = {mdl.cfg.n_layers} "
            "layers: per layer L (D + K D) + n K; global D + K D + n K"
        )
        lw["matched"] = [{"K_layer": k, "K_global": matched[k]} for k in layer_ks]
        lw["variance"] = {
            "cumulative_variance": layer_pca.cumulative_variance_.tolist(),
            "explained_variance_ratio": layer_pca.explained_variance_ratio_.tolist(),
        }
    if cfg.baselines:
        data.setdefault("baselines", {"random_subspace": []})
    n_points = (
        1
        + len(ks)
        + len(cluster_ks)
        + (1 + len(ks) if by_importance else 0)
        + len(layer_ks)
        + len(glob_ks)
        + ((1 + len(rand_ks)) if cfg.baselines else 0)
        + int(cfg.gauges > 0)
    )

    def status() -> dict[str, Any]:
        done = int("baseline" in data) + len(data["perplexity_vs_k"]) + len(data["clustering"]["rows"])
        if by_importance:
            done += int("order" in data.get("importance", {})) + len(data["perplexity_vs_k_importance"])
        if cfg.groupby == "layer":
            done += len(data["layerwise"]["per_layer"]) + len(data["layerwise"]["global"])
        if cfg.baselines:
            bl = data["baselines"]
            done += int("spectrum_nulls" in bl) + len({r["K"] for r in bl["random_subspace"]})
        done += int(cfg.gauges > 0 and "gauge_study" in data)
        return {"complete": done == n_points, "points_done": done, "points_total": n_points}

    last = [time.perf_counter()]

    def finish_point(key: str) -> None:
        now = time.perf_counter()
        timings["points_s"][key] = now - last[0]
        last[0] = now
        run_entry["evaluated"].append(key)
        data["perplexity_vs_k"].sort(key=lambda r: r["K"])
        data["clustering"]["rows"].sort(key=lambda r: r["k"])
        if by_importance:
            data["perplexity_vs_k_importance"].sort(key=lambda r: r["K"])
        if cfg.diagnostics:
            data["attention_diagnostics"]["rows"].sort(key=lambda r: (r["K"], r["layer"], r["head"]))
        if cfg.groupby == "layer":
            for sec in ("per_layer", "global"):
                data["layerwise"][sec].sort(key=lambda r: r["K"])
        if cfg.baselines:
            data["baselines"]["random_subspace"].sort(key=lambda r: (r["K"], r["seed"]))
        data["status"] = status()
        store.save()

    data["status"] = status()
    store.save()

    # baseline (kept with its per-chunk NLL so resumed points pair with exactly the same numbers)
    if "baseline" in data:
        b = data["baseline"]
        baseline = PerplexityResult(
            b["ppl"], b["mean_nll"], np.asarray(b["nll_per_chunk"], dtype=np.float64), b["n_predicted_tokens"]
        )
    else:
        last[0] = time.perf_counter()
        baseline = perplexity(mdl, tokens, batch_size=cfg.batch_size, progress=cfg.progress, desc="baseline")
        data["baseline"] = {
            "ppl": baseline.ppl,
            "mean_nll": baseline.mean_nll,
            "n_predicted_tokens": baseline.n_tokens,
            "nll_per_chunk": baseline.nll_per_chunk.tolist(),
        }
        finish_point("baseline")

    # 6B: K sweep
    done_k = {int(r["K"]) for r in data["perplexity_vs_k"]}
    todo_k = [k for k in ks if k not in done_k]
    if todo_k:

        def on_k_row(row: dict[str, Any]) -> None:
            records = row.pop("attention_diagnostics", None)
            if records is not None:  # this K's per-head rows are saved together with its point
                assert diag_tokens is not None  # sweep_k only returns records when given diag_tokens
                target = pca.reconstruct(int(row["K"])).to(mdl.W_U.device)
                change = head_output_change(
                    mdl,
                    diag_tokens,
                    lambda: inject_circuit(mdl, target, cfg.circuit),  # type: ignore[arg-type]
                    batch_size=cfg.batch_size,
                    progress=False,
                )
                for rec in records:
                    rec["output_change_z"] = float(change["z"][rec["layer"], rec["head"]])
                    rec["output_change_write"] = float(change["write"][rec["layer"], rec["head"]])
                data["attention_diagnostics"]["rows"].extend(jsonable(records))
            data["perplexity_vs_k"].append(jsonable(row))
            finish_point(f"K={row['K']}")

        last[0] = time.perf_counter()
        if cfg.space == "raw":
            sweep_k(
                mdl,
                pca,
                tokens,
                todo_k,
                batch_size=cfg.batch_size,
                progress=cfg.progress,
                baseline=baseline,
                n_boot=cfg.n_boot,
                seed=cfg.seed,
                on_row=on_k_row,
                circuit=cfg.circuit,
                diagnostics=cfg.diagnostics,
                diag_tokens=diag_tokens,
                diagnostics_options={"head_scores": cfg.head_scores} if cfg.diagnostics else None,
            )
        else:  # the sweep runs inside the space's gauge, paired with the (gauge-independent) baseline
            sweep_space(
                mdl,
                tokens,
                todo_k,
                space=cfg.space,
                baseline=baseline,
                batch_size=cfg.batch_size,  # type: ignore[arg-type]
                progress=cfg.progress,
                n_boot=cfg.n_boot,
                seed=cfg.seed,
                on_row=on_k_row,
                pca=pca,
            )

    # importance-ordered K sweep (issue 6): rank once on separate tokens, then sweep the same K grid
    if by_importance:
        imp_sec = data.get("importance") or {}
        if "order" not in imp_sec:
            assert rank_tokens is not None  # checked when the side tokens were prepared
            last[0] = time.perf_counter()
            imp = component_importance(
                mdl,
                pca,
                rank_tokens,
                method=cfg.importance_method,
                circuit=cfg.circuit,  # type: ignore[arg-type]
                batch_size=cfg.batch_size,
                progress=cfg.progress,
                n_boot=cfg.n_boot,
                seed=cfg.seed,
            )
            data["importance"] = {
                "method": cfg.importance_method,
                "circuit": cfg.circuit,
                "score": imp.attrs["score"],
                "n_tokens": imp.attrs["n_tokens"],
                "baseline_ppl": imp.attrs.get("baseline_ppl"),
                "order": importance_order(imp),
                "variance_order": list(range(pca.n_components_)),
                "components": jsonable(imp.to_dict("records")),
            }
            finish_point("importance")
        ranking = list(data["importance"]["order"])
        done_i = {int(r["K"]) for r in data["perplexity_vs_k_importance"]}
        todo_i = [k for k in ks if k not in done_i]
        if todo_i:

            def on_i_row(row: dict[str, Any]) -> None:
                data["perplexity_vs_k_importance"].append(jsonable(row))
                finish_point(f"importance K={row['K']}")

            last[0] = time.perf_counter()
            sweep_k(
                mdl,
                pca,
                tokens,
                todo_i,
                batch_size=cfg.batch_size,
                progress=cfg.progress,
                baseline=baseline,
                n_boot=cfg.n_boot,
                seed=cfg.seed,
                on_row=on_i_row,
                circuit=cfg.circuit,
                order="importance",
                importance=ranking,
            )

    # 6C: clustering
    done_c = {int(r["k"]) for r in data["clustering"]["rows"]}
    todo_c = [k for k in cluster_ks if k not in done_c]
    if todo_c:

        def on_c_row(row: dict[str, Any]) -> None:
            row = {k: v for k, v in row.items() if k not in ("assignments", "representatives")}
            data["clustering"]["rows"].append(jsonable(row))
            finish_point(f"cluster_k={row['k']}")

        last[0] = time.perf_counter()
        cl_kw: dict[str, Any] = {
            "n_dims": cfg.n_dims,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "progress": cfg.progress,
            "baseline": baseline,
            "n_boot": cfg.n_boot,
            "on_row": on_c_row,
        }
        if cfg.space == "circuit":
            sweep_circuit_clusters(mdl, pca, tokens, todo_c, **cl_kw)
        else:
            with space_context(mdl, cfg.space):  # type: ignore[arg-type]
                sweep_clusters(mdl, pca, tokens, todo_c, W=W, circuit=cfg.circuit, **cl_kw)

    sw_kw: dict[str, Any] = {
        "baseline": baseline,
        "batch_size": cfg.batch_size,
        "progress": cfg.progress,
        "n_boot": cfg.n_boot,
    }
    # per-layer PCA (issue 5): same K in every layer, and the global PCA at matched parameter count
    if cfg.groupby == "layer":
        lw = data["layerwise"]
        for key, grid, grouping, fitted in (
            ("per_layer", layer_ks, "layer", layer_pca),
            ("global", glob_ks, None, pca),
        ):
            todo = [k for k in grid if k not in {int(r["K"]) for r in lw[key]}]
            if not todo:
                continue

            def on_lw_row(row: dict[str, Any], key: str = key) -> None:
                lw[key].append(jsonable(row))
                finish_point(f"{'layer' if key == 'per_layer' else 'matched global'} K={row['K']}")

            last[0] = time.perf_counter()
            sweep_space(
                mdl,
                tokens,
                todo,
                space=cfg.space,
                groupby=grouping,
                seed=cfg.seed,  # type: ignore[arg-type]
                on_row=on_lw_row,
                pca=fitted,
                **sw_kw,
            )

    # null baselines (issue 5): spectrum nulls, then random K-dim subspaces (one point per K)
    if cfg.baselines:
        bl = data["baselines"]
        if "spectrum_nulls" not in bl:
            last[0] = time.perf_counter()
            nulls = spectrum_nulls(mdl, cfg.space, n_seeds=cfg.baseline_seeds, seed=cfg.seed)  # type: ignore[arg-type]
            bl["spectrum_nulls"] = jsonable(nulls.to_dict("records"))
            finish_point("spectrum nulls")
        for K in [k for k in rand_ks if k not in {int(r["K"]) for r in bl["random_subspace"]}]:
            last[0] = time.perf_counter()
            rand = random_subspace_sweep(
                mdl,
                tokens,
                [K],
                space=cfg.space,
                n_seeds=cfg.baseline_seeds,  # type: ignore[arg-type]
                seed=1_000_003 * cfg.seed + K,
                **sw_kw,
            )
            bl["random_subspace"].extend(jsonable(rand.to_dict("records")))
            finish_point(f"random K={K}")
        rows_r = bl["random_subspace"]
        bl["summary"] = jsonable(summarize_random(pd.DataFrame(rows_r)).to_dict("records")) if rows_r else []

    # gauge study (issue 5): raw and circuit curves under random gauges (one point, saved when done)
    if cfg.gauges and "gauge_study" not in data:
        last[0] = time.perf_counter()
        study = gauge_study(
            mdl,
            tokens,
            ks,
            n_gauges=cfg.gauges,
            seed=cfg.seed + 1,
            batch_size=cfg.batch_size,
            progress=cfg.progress,
            n_boot=cfg.n_boot,
        )
        data["gauge_study"] = jsonable(study.summary())
        finish_point("gauge study")

    # checks and gate
    k_rows = data["perplexity_vs_k"]
    all_row = next(r for r in k_rows if r["K"] == n)
    k_all_err = abs(all_row["ratio"] - 1.0)
    data["checks"] = {
        "k_all": {
            "K": n,
            "ppl": all_row["ppl"],
            "baseline_ppl": baseline.ppl,
            "ratio": all_row["ratio"],
            "abs_ratio_error": k_all_err,
            "tolerance": K_ALL_TOLERANCE,
            "ok": k_all_err <= K_ALL_TOLERANCE,
        },
        "max_injection_residual": {
            "k_sweep": max(r["max_residual"] for r in k_rows),
            "clustering": max((r["max_residual"] for r in data["clustering"]["rows"]), default=0.0),
        },
        "pca_reconstruction_max_abs_error": (
            None if W is None else float((pca.reconstruct(n).cpu() - W.cpu()).abs().max())
        ),
        "replaced_equals_n_heads_minus_k": all(
            r["replaced"] == n - r["k"] for r in data["clustering"]["rows"]
        ),
    }
    if by_importance:
        imp_all = next(r for r in data["perplexity_vs_k_importance"] if r["K"] == n)
        err = abs(imp_all["ratio"] - 1.0)
        data["checks"]["k_all_importance"] = {
            "K": n,
            "ratio": imp_all["ratio"],
            "abs_ratio_error": err,
            "tolerance": K_ALL_TOLERANCE,
            "ok": err <= K_ALL_TOLERANCE,
        }
    if cfg.groupby == "layer":
        lw_all = next(r for r in data["layerwise"]["per_layer"] if r["K"] == m_layer)
        data["checks"]["k_all_layerwise"] = {
            "K": m_layer,
            "ratio": lw_all["ratio"],
            "abs_ratio_error": abs(lw_all["ratio"] - 1.0),
            "tolerance": K_ALL_TOLERANCE,
            "ok": abs(lw_all["ratio"] - 1.0) <= K_ALL_TOLERANCE,
        }
    if cfg.gauges:
        data["checks"]["gauge_baseline"] = {
            "max_rel_change": data["gauge_study"]["baseline_max_rel_change"],
            "ok": data["gauge_study"]["baseline_ok"],
        }
    if cfg.diagnostics:
        at_all = [r for r in data["attention_diagnostics"]["rows"] if r["K"] == n]
        data["checks"]["diagnostics_k_all"] = {
            "K": n,
            "max_kl": max((r["kl"] or 0.0) for r in at_all),
            "max_js": max((r["js"] or 0.0) for r in at_all),
            "min_top1_agreement": min(r["top1_agreement"] for r in at_all),
            "max_output_change_write": max((r["output_change_write"] or 0.0) for r in at_all),
        }
    if not data["checks"]["k_all"]["ok"]:
        warnings.warn(
            f"K=all (K={n}) gives perplexity ratio {all_row['ratio']!r}, not within {K_ALL_TOLERANCE} of 1",
            RuntimeWarning,
            stacklevel=2,
        )
    data["gate"] = gate_check(k_rows, cfg.gate_k, cfg.gate_threshold).as_dict()
    data["status"] = status()
    run_entry["finished"] = _now()
    run_entry["wall_s"] = time.perf_counter() - t_run
    store.save()

    from . import plots
    from .report import render_report

    figures = plots.experiment_figures(data)
    files = {fname: plots.save_figure(fig, out, fname, png=cfg.png) for fname, fig in figures.items()}
    result = ExperimentResult(results=data, path=store.path, figures=figures, figure_files=files)
    if write_report:
        result.report_path = out / "report.md"
        result.report_path.write_text(render_report([data]), encoding="utf-8")
    return result


def run_models(
    models: Sequence[str | os.PathLike | HookedTransformer],
    out_dir: str | os.PathLike = "results",
    config: ExperimentConfig | None = None,
    *,
    tokens: torch.Tensor | None = None,
    diag_tokens: torch.Tensor | None = None,
    rank_tokens: torch.Tensor | None = None,
    **overrides: Any,
) -> tuple[list[ExperimentResult], list[tuple[str, str]]]:
    """Run several models in order behind the gate: model i+1 runs only if model i passed it.

    This is the report's 6D: GPT-2 medium was skipped because GPT-2 small's ratio at K=10 was
    not within 1.1x. Writes one ``report.md`` covering every model run and every model skipped.

    ``tokens`` (optional) are used for every model instead of the config's text (and
    ``diag_tokens`` / ``rank_tokens`` with ``diagnostics`` / ``order="importance"``).

    Returns:
        (results of the models that ran, [(skipped model, reason)]).
    """
    cfg = (config or ExperimentConfig()).replace(**overrides)
    done: list[ExperimentResult] = []
    skipped: list[tuple[str, str]] = []
    for i, m in enumerate(models):
        if done and done[-1].gate.passed is not True:
            g = done[-1].gate
            reason = f"gate failed on {done[-1].name}: {g.reason}"
            skipped = [(model_display_name(x), reason) for x in models[i:]]
            break
        done.append(
            run_experiment(
                m,
                out_dir,
                cfg,
                tokens=tokens,
                write_report=False,
                diag_tokens=diag_tokens,
                rank_tokens=rank_tokens,
            )
        )
    from .report import render_report

    report = Path(out_dir).expanduser() / "report.md"
    report.write_text(render_report([r.results for r in done], skipped=skipped), encoding="utf-8")
    for r in done:
        r.report_path = report
    return done, skipped
