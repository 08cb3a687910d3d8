"""The Ray executor, timed: one K sweep on 1 and on 2 single-thread Ray workers, side by side in one run,
with the serial executor (single-thread and default threads) for reference, and the scheduling overhead
per point.

    python benchmarks/bench_ray.py                      # embedded stories260K, prints and appends to RESULTS.md
    python benchmarks/bench_ray.py --model ../shared/data/models/stories260K \\
        --text-file ../shared/data/tinystories/tinystories_val.txt --no-append

Every configuration evaluates the same plans (K = 1 .. all) against the same baseline; the workers are
started and have loaded the model before their clock starts (start-up is reported on its own line). The
overhead per point is measured on the same plans with no perplexity to compute (each plan's edit and
restore only): ``(1-worker wall - serial single-thread wall) / points`` is then what scheduling, shipping
the job and returning the row cost, without the noise of the evaluations themselves; it is given as a
share of one point's evaluation on one thread. Rows are checked equal across executors.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone

import common
import pandas as pd
import torch

import qk_subspace as qs
from qk_subspace.decomposition.plans import topk_plans
from qk_subspace.evaluation.perplexity import perplexity
from qk_subspace.evaluation.sweep import run_sweep
from qk_subspace.execution.base import SerialExecutor
from qk_subspace.execution.ray_executor import RayExecutor
from qk_subspace.experiment.config import ExperimentConfig
from qk_subspace.experiment.inputs import evaluation_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stories260K", help="model (default: the embedded stories260K)")
    ap.add_argument("--text-file", default=None, help="evaluation text (default: the embedded tokens)")
    ap.add_argument("--n-tokens", type=int, default=16384, help="evaluation tokens (default 16384)")
    ap.add_argument("--ctx", type=int, default=256, help="chunk length (default 256)")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import ray

    default_threads = torch.get_num_threads()
    model = qs.load_model(args.model)
    cfg = ExperimentConfig().replace(text_file=args.text_file, n_tokens=args.n_tokens, ctx=args.ctx)
    tokens, _ = evaluation_tokens(model, cfg)
    rep = qs.representations.get("qk")
    heads = rep.heads(model)
    pca = qs.HeadPCA().fit(heads)
    plans = topk_plans(pca, range(1, pca.n_heads_ + 1))
    baseline = perplexity(model, tokens, progress=False)
    kw = dict(baseline=baseline, progress=False)

    def timed(executor: object, threads: int | None = None) -> tuple[float, pd.DataFrame]:
        if threads is not None:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        df = run_sweep(model, tokens, rep, heads, plans, executor=executor, **kw)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
        torch.set_num_threads(default_threads)
        return wall, df

    def empty(executor: object) -> float:
        """Median wall of the plans with no evaluation (edit, restore, and the executor's own work)."""
        torch.set_num_threads(1)
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            run_sweep(model, None, rep, heads, plans, executor=executor, progress=False)  # type: ignore[arg-type]
            walls.append(time.perf_counter() - t0)
        torch.set_num_threads(default_threads)
        return statistics.median(walls)

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    walls: dict[str, float] = {}
    frames: dict[str, pd.DataFrame] = {}
    startup: dict[int, float] = {}
    empties: dict[str, float] = {}
    order = ["serial, 1 thread", "ray, 1 worker", "ray, 2 workers", f"serial, {default_threads} threads"]
    for label in order:  # side by side in one run; one executor's workers at a time (2 CPUs)
        if label.startswith("ray"):
            n = 1 if "1 worker" in label else 2
            with RayExecutor(workers=n, threads_per_worker=1) as ex:
                t0 = time.perf_counter()
                ex._start(model)
                ex.worker_pids()  # returns once every worker has loaded the model
                startup[n] = time.perf_counter() - t0
                walls[label], frames[label] = timed(ex)
                if n == 1:
                    empties["ray"] = empty(ex)
        else:
            threads = 1 if "1 thread" in label else default_threads
            walls[label], frames[label] = timed(SerialExecutor(), threads)
            if threads == 1:
                empties["serial"] = empty(SerialExecutor())
    ray.shutdown()
    ref = frames["serial, 1 thread"]
    for label, df in frames.items():
        pd.testing.assert_frame_equal(df, ref, check_exact=True, obj=label)

    points = len(plans)
    per_point = walls["serial, 1 thread"] / points
    overhead = (empties["ray"] - empties["serial"]) / points
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/bench_ray.py" + (f" --model {args.model}" if args.model != "stories260K" else "")
    if args.text_file:
        cmd += f" --text-file {args.text_file}"
    lines = [
        f"### {now} -- `{cmd} --n-tokens {args.n_tokens} --ctx {args.ctx}`",
        "",
        f"{common.machine_info()}; {common.versions()}; ray {ray.__version__}",
        "",
        f"One K sweep: {points} points (K = 1..{points}) of {model.cfg.model_name} on "
        f"{tokens.shape[0]} x {tokens.shape[1]} tokens; rows identical across all four (checked).",
        "",
        "| executor | wall (s) | per point (s) | speed-up vs 1 worker |",
        "|---|---|---|---|",
        *(
            f"| {label} | {walls[label]:.2f} | {walls[label] / points:.3f} | "
            f"{walls['ray, 1 worker'] / walls[label]:.2f}x |"
            for label in order
        ),
        "",
        f"- 2 single-thread workers vs 1: **{walls['ray, 1 worker'] / walls['ray, 2 workers']:.2f}x**",
        f"- scheduling overhead per point: {overhead * 1e3:.1f} ms = **{100 * overhead / per_point:.1f} %** of a "
        f"point's evaluation ({per_point * 1e3:.0f} ms on one thread); measured on the same plans without "
        f"the perplexity (edit and restore only, median of 5): {empties['serial'] / points * 1e3:.1f} ms per point "
        f"serial, {empties['ray'] / points * 1e3:.1f} ms on 1 worker",
        f"- worker start-up (start actors, load the model; not in the walls above): "
        f"{startup[1]:.1f} s for 1 worker, {startup[2]:.1f} s for 2",
    ]
    common.publish(
        lines,
        args.no_append,
        "## Ray executor: workers vs serial",
        "Appended by `benchmarks/bench_ray.py`, newest last.",
    )


if __name__ == "__main__":
    main()
