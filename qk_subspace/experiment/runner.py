"""The whole experiment of the seed report, composed from stages (6A variance, 6B K sweep, 6C clustering,
2D map, gate, and the optional studies).

:func:`run_experiment` only composes: :func:`~qk_subspace.experiment.context.prepare` (model, tokens,
representation, PCA, grids) -> the results store (:mod:`~qk_subspace.experiment.store`, resumable,
rewritten atomically after every point) -> every enabled stage of
:data:`~qk_subspace.experiment.stages.STAGES` (set up, then run) -> checks and gate -> figures
(:mod:`qk_subspace.viz`) -> ``report.md`` (:mod:`qk_subspace.report`). Results go to
``<out>/exp6_<model>.json``; an interrupted run continues with ``resume=True`` (CLI ``--resume``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..execution.base import Executor, opened_executor
from .config import ExperimentConfig
from .context import RunContext, prepare
from .gate import GateResult, gate_check
from .inputs import model_display_name
from .lock import shared_folder
from .metadata import build_metadata
from .stages import STAGES, PointLog
from .store import ResultsStore

_PREPARING = threading.Lock()

__all__ = ["ExperimentResult", "run_experiment", "run_models"]


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
    figures: dict[str, Any] = field(default_factory=dict, repr=False)
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
        from ..report import result_tables

        return result_tables(self.results)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_output_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a path, refused at once if it is not (or cannot become) a writable directory.

    Nothing is created here: a run refused before its first evaluation leaves no folder behind.
    """
    out = Path(out_dir).expanduser()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise PermissionError(
            f"out_dir {str(out)!r} cannot be created ({str(existing)!r} is a file); it must be a writable directory"
        )
    if not os.access(existing, os.W_OK):
        what = (
            "is not writable" if existing == out else f"cannot be created ({str(existing)!r} is not writable)"
        )
        raise PermissionError(f"out_dir {str(out)!r} {what}; it must be a writable directory")
    return out


def run_experiment(
    model: Any,
    out_dir: str | os.PathLike = "results",
    config: ExperimentConfig | None = None,
    *,
    tokens: torch.Tensor | None = None,
    write_report: bool = True,
    diag_tokens: torch.Tensor | None = None,
    rank_tokens: torch.Tensor | None = None,
    executor: Executor | str | None = None,
    **overrides: Any,
) -> ExperimentResult:
    """Run 6A/6B/6C + the 2D map + the gate (and the enabled studies) for one model; write to ``out_dir``.

    Args:
        model: an official name (``"gpt2"``), a local checkpoint directory, or a loaded model.
        out_dir: output directory (created).
        config: options (:class:`~qk_subspace.experiment.config.ExperimentConfig`); keyword ``overrides``
            replace options by name (``n_tokens=4096``, ``ks=(1, 3)``, ...).
        tokens: evaluation tokens ``[n_chunks, ctx]`` to use instead of the config's text.
        write_report: also write ``<out_dir>/report.md`` for this model alone.
        diag_tokens: ``[n_seqs, pos]`` diagnostic batch (``diagnostics``) instead of the text after
            the perplexity tokens (required with ``tokens``).
        rank_tokens: ``[n, ctx]`` importance-ranking tokens (``order="importance"``) instead of the
            text after the diagnostic batch (required with ``tokens``).
        executor: where the points are evaluated: ``"serial"`` (default) or ``"ray"`` (the
            ``--executor`` option, with ``workers``, ``ray_address``, ... from the config), or an
            executor object (:mod:`qk_subspace.execution`; it stays open for the caller). The results
            are the same apart from ``timings`` and ``metadata.executor``.

    Writes ``exp6_<model>.json`` (sections ``metadata``, ``variance``, ``baseline``, ``perplexity_vs_k``,
    ``clustering``, ``pca_map``, ``checks``, ``gate``, one per enabled study; clock times only in
    ``timings``), the figures as HTML (+ PNG) and ``report.md``.

    Raises:
        FileExistsError: results for this model exist and neither ``resume`` nor ``overwrite`` is set.
        qk_subspace.experiment.store.ConfigMismatchError: ``resume`` on a different configuration.
    """
    if isinstance(executor, str):
        overrides["executor"] = executor
    cfg = (config or ExperimentConfig()).replace(**overrides)
    out = _check_output_dir(out_dir)
    t_run, started = time.perf_counter(), _now()
    with opened_executor(executor, cfg.execution) as ex:  # refusals: here and in prepare, before any write
        with _PREPARING:  # loading is not thread-safe (model series run in threads)
            ctx = prepare(model, cfg, tokens, diag_tokens, rank_tokens)
        ctx.executor = ex
        stages = [s for s in STAGES if s.enabled(cfg)]
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"exp6_{ctx.name}.json"
        with ResultsStore.open(
            path, build_metadata(ctx), resume=cfg.run.resume, overwrite=cfg.run.overwrite
        ) as store:
            data = _run_stages(store, ctx, stages, started, t_run)
    families = tuple(f for stage in stages for f in stage.figures)
    return _write_outputs(data, path, out, families, cfg.run.png, write_report)


def _run_stages(
    store: ResultsStore, ctx: RunContext, stages: list[Any], started: str, t_run: float
) -> dict[str, Any]:
    """Every enabled stage into the store's document, saved after every point; returns the document."""
    cfg = ctx.config
    data = store.payload
    run_entry: dict[str, Any] = {
        "started": started,
        "resumed": store.resumed,
        "evaluated": [],
        "stages_s": ctx.stage_s,
    }
    data["timings"] = data.get("timings") or {"runs": [], "points_s": {}}
    data["timings"]["runs"].append(run_entry)
    log = PointLog(store, ctx, stages, run_entry)
    for stage in stages:
        stage.setup(ctx, data)
    log.save()
    for stage in stages:
        stage.run(ctx, data, log)
    data["checks"] = {k: v for stage in stages for k, v in stage.checks(ctx, data).items()}
    data["gate"] = gate_check(data["perplexity_vs_k"], cfg.sweeps.gate_k, cfg.sweeps.gate_threshold).as_dict()
    run_entry.update(finished=_now(), wall_s=time.perf_counter() - t_run)
    log.save()
    return data


def _write_outputs(
    data: dict[str, Any], path: Path, out: Path, families: tuple[str, ...], png: bool, write_report: bool
) -> ExperimentResult:
    """Figures (HTML, PNG where possible) and, if asked, ``report.md`` of a finished results document."""
    from .. import viz
    from ..report import render_report

    figures = viz.experiment_figures(data, families)
    files = {name: viz.save_figure(fig, out, name, png=png) for name, fig in figures.items()}
    result = ExperimentResult(results=data, path=path, figures=figures, figure_files=files)
    if write_report:
        result.report_path = out / "report.md"
        result.report_path.write_text(render_report([data], files=[files]), encoding="utf-8")
    return result


def run_models(
    models: Sequence[Any],
    out_dir: str | os.PathLike = "results",
    config: ExperimentConfig | None = None,
    *,
    tokens: torch.Tensor | None = None,
    diag_tokens: torch.Tensor | None = None,
    rank_tokens: torch.Tensor | None = None,
    executor: Executor | str | None = None,
    **overrides: Any,
) -> tuple[list[ExperimentResult], list[tuple[str, str]]]:
    """Run a series of models; by default in order behind the gate: model i+1 runs only if model i passed it.

    This is the report's 6D: GPT-2 medium was skipped because GPT-2 small's ratio at K=10 was
    not within 1.1x. With ``gate=False`` (``--no-gate``) every model runs; on the Ray executor the
    models then run as parallel groups, sharing the workers (each group a driver thread with its own
    workers, at most one group per worker). Writes one ``report.md`` covering every model run and every
    model skipped and, for two or more models, the cross-model summary ``series_summary.json`` (and its
    figure). ``tokens`` (optional) are used for every model instead of the config's text (and
    ``diag_tokens`` / ``rank_tokens`` with ``diagnostics`` / ``order="importance"``).

    Returns:
        (results of the models that ran, in series order, [(skipped model, reason)]).
    """
    from ..report import render_report

    if isinstance(executor, str):
        overrides["executor"] = executor
    cfg = (config or ExperimentConfig()).replace(**overrides)
    inputs = {"tokens": tokens, "diag_tokens": diag_tokens, "rank_tokens": rank_tokens}
    with opened_executor(executor, cfg.execution) as ex:
        skipped: list[tuple[str, str]] = []
        if not cfg.execution.gate and ex.remote and len(models) > 1:
            done = _run_parallel(models, out_dir, cfg, ex, inputs)
        else:
            done, skipped = _run_in_order(models, out_dir, cfg, ex, inputs)
    out = Path(out_dir).expanduser()
    report = out / "report.md"
    text = render_report([r.results for r in done], skipped=skipped, files=[r.figure_files for r in done])
    report.write_text(text, encoding="utf-8")
    for r in done:
        r.report_path = report
    if len(models) > 1:
        _write_series_summary(done, skipped, out, cfg.run.png)
    return done, skipped


def _run_in_order(
    models: Sequence[Any], out_dir: Any, cfg: ExperimentConfig, ex: Executor, inputs: dict[str, Any]
) -> tuple[list[ExperimentResult], list[tuple[str, str]]]:
    done: list[ExperimentResult] = []
    for i, m in enumerate(models):
        if cfg.execution.gate and done and done[-1].gate.passed is not True:
            reason = f"gate failed on {done[-1].name}: {done[-1].gate.reason}"
            return done, [(model_display_name(x), reason) for x in models[i:]]
        done.append(run_experiment(m, out_dir, cfg, write_report=False, executor=ex, **inputs))
    return done, []


def _run_parallel(
    models: Sequence[Any], out_dir: Any, cfg: ExperimentConfig, ex: Any, inputs: dict[str, Any]
) -> list[ExperimentResult]:
    """Every model as its own group of Ray workers, ``min(models, workers)`` groups at a time."""
    from concurrent.futures import ThreadPoolExecutor

    total = ex.n_workers()  # also joins (or starts) the Ray instance, once, before the threads
    groups = min(len(models), total)
    per_group = replace(cfg.execution, workers=max(1, total // groups))

    def one(model: Any) -> ExperimentResult:
        with opened_executor(None, per_group) as own:
            return run_experiment(model, out_dir, cfg, write_report=False, executor=own, **inputs)

    with (
        shared_folder(Path(out_dir).expanduser()),  # one writer: this series (its runs join the lock)
        ThreadPoolExecutor(max_workers=groups, thread_name_prefix="qk-subspace-model") as pool,
    ):
        futures = [pool.submit(one, m) for m in models]
        return [f.result() for f in futures]  # the first error is raised once every group has ended


def _write_series_summary(
    done: list[ExperimentResult], skipped: list[tuple[str, str]], out: Path, png: bool
) -> None:
    """``series_summary.json`` and its figure (``series_summary.html``/``.png``) in ``out``."""
    from .. import viz
    from ..report.series import series_summary
    from .store import atomic_write_json

    summary = series_summary([r.results for r in done], skipped)
    atomic_write_json(out / "series_summary.json", summary)
    for name, fig in viz.experiment_figures(summary, ("series",)).items():
        viz.save_figure(fig, out, name, png=png)
