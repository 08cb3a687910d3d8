"""``qk-subspace compare``: :func:`~qk_subspace.evaluation.compare.compare_spaces` on one model, with a
resumable results file, a figure and a report section.

Writes into ``out``: ``compare_<model>.json`` (``metadata``, ``points`` -- the finished curves, what
``--resume`` reuses -- ``comparison`` -- the summary with its table -- and ``timings`` last; the same
inputs give byte-identical files apart from ``timings``), ``compare_<model>.html`` / ``.png`` and
``compare_<model>.md``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation.compare import SpaceComparison, compare_spaces
from ..model.embedded import is_embedded
from .compare_config import CompareConfig
from .config import ExperimentConfig
from .context import _load
from .inputs import evaluation_tokens, sha256_tokens
from .metadata import model_config, package_versions
from .store import ResultsStore

__all__ = ["CompareResult", "compare_tokens", "run_compare"]


@dataclass
class CompareResult:
    """What :func:`run_compare` wrote: the comparison, the results file, the figure files and the report."""

    comparison: SpaceComparison
    path: Path
    report_path: Path
    figure_files: dict[str, str] = field(default_factory=dict)


def compare_tokens(model: Any, config: CompareConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The comparison's tokens ``[n, ctx]`` and how they were made (``--tokens text`` or ``repeated``)."""
    c = config.compare
    if c.tokens == "repeated":
        ctx = c.ctx or int(model.cfg.n_ctx)
        if ctx > int(model.cfg.n_ctx):
            raise ValueError(f"ctx (--ctx) {ctx} exceeds the model's n_ctx={model.cfg.n_ctx}")
        if c.block > ctx // 2:
            raise ValueError(f"block (--block) {c.block} must be at most half of ctx={ctx} (it is repeated)")
        gen = torch.Generator().manual_seed(0)
        block = torch.randint(0, int(model.cfg.d_vocab), (c.n_seqs, c.block), generator=gen)
        tokens = block.repeat(1, -(-ctx // c.block))[:, :ctx].contiguous()
        protocol = {"tokens": "repeated", "block": c.block, "n_seqs": c.n_seqs, "ctx": ctx, "seed": 0}
    else:
        if getattr(model, "tokenizer", None) is None and not is_embedded(model):
            raise ValueError(
                "the model has no tokenizer, so --tokens text cannot tokenize a text; use --tokens repeated "
                "(random blocks repeated to --ctx) or a checkpoint with tokenizer files"
            )
        run_cfg = ExperimentConfig().replace(text_file=c.text_file, n_tokens=c.n_tokens, ctx=c.ctx)
        tokens, protocol = evaluation_tokens(model, run_cfg)
        protocol = {"tokens": "text", **protocol}
    protocol["tokens_sha256"] = sha256_tokens(tokens)
    return tokens, protocol


def run_compare(
    model: Any, out_dir: str | os.PathLike = "results", config: CompareConfig | None = None, **overrides: Any
) -> CompareResult:
    """Compare the raw, canonical and invariant QK PCA of ``model`` (a name, directory or loaded model).

    ``overrides`` replace options of ``config`` by name (``gauges=1``, ``ks=(1, 3)``, ...).
    """
    cfg = (config or CompareConfig()).replace(**overrides)
    t0 = time.perf_counter()
    mdl, source, name = _load(
        model, ExperimentConfig().replace(**{k: getattr(cfg.run, k) for k in ("device", "dtype", "backend")})
    )
    tokens, protocol = compare_tokens(mdl, cfg)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    c = cfg.compare
    metadata = {
        "model": name,
        "source": source,
        "backend": getattr(mdl, "qk_subspace_backend", None),
        "model_config": model_config(mdl),
        "protocol": protocol,
        "options": {
            k: v for k, v in cfg.flat().items() if k not in ("resume", "overwrite", "png", "progress")
        },
        "package_versions": package_versions(),
    }
    store = ResultsStore.open(
        out / f"compare_{name}.json", metadata, resume=cfg.run.resume, overwrite=cfg.run.overwrite
    )
    try:
        points: dict[str, Any] = store.payload.setdefault("points", {})

        def on_point(key: str, rows: list[dict[str, Any]], baselines: dict[int, float]) -> None:
            points[key] = rows
            store.save()

        comparison = compare_spaces(
            mdl, tokens, ks=c.ks, gauges=c.gauges, seeds=c.seeds, cond=c.cond, gauge_seed=c.gauge_seed,
            batch_size=c.batch_size, progress=cfg.run.progress, n_boot=c.n_boot, done=dict(points), on_point=on_point,
        )  # fmt: skip
        comparison.config["model"] = name
        store.payload["comparison"] = comparison.summary()
        store.payload["timings"] = {"wall_s": time.perf_counter() - t0}
        store.save()
    finally:
        store.close()
    from ..report.compare import render_compare_report
    from ..viz import save_figure

    files = save_figure(comparison.figure, out, f"compare_{name}", png=cfg.run.png)
    report = out / f"compare_{name}.md"
    report.write_text(render_compare_report(store.payload, files), encoding="utf-8")
    return CompareResult(comparison=comparison, path=store.path, report_path=report, figure_files=files)
