"""The Ray executor on a local Ray instance: the same results as the serial executor, number for number;
a worker killed mid-sweep is restarted and its point retried; a driver killed mid-run is resumed without
recomputing finished points; a point that fails fails the run once; model series as parallel groups.

Ray is an optional extra: without it these tests skip, and ``--executor ray`` is a clear error (checked in
``test_executor_without_ray_is_a_clear_error``, which runs everywhere).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main
from qk_subspace.decomposition.plans import topk_plans
from qk_subspace.evaluation.sweep import run_sweep
from qk_subspace.experiment.runner import run_experiment, run_models
from qk_subspace.experiment.store import load_results

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "tinystories" / "tinystories_val.txt"
needs_shared = pytest.mark.skipif(
    not (STORIES.is_dir() and TINYSTORIES.is_file()), reason="needs ../shared (stories260K, TinyStories)"
)
#: A run on the embedded model with every stage that can use the executor.
SMALL = [
    "--n-tokens",
    "8192",
    "--ctx",
    "128",
    "--baselines",
    "--groupby",
    "layer",
    "--no-png",
    "--no-progress",
]


def comparable(path: Path) -> str:
    """The results JSON without what may differ between executors: ``timings`` and ``metadata.executor``."""
    data = load_results(path)
    data.pop("timings")
    data["metadata"].pop("executor")
    return json.dumps(data)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """One local Ray instance (2 CPUs) for the whole module."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network here, and nothing to report
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")  # a new one
    yield ray
    ray.shutdown()


def _serial(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "serial"
    assert main(["run", *args, "--out", str(out)]) == 0
    (path,) = out.glob("exp6_*.json")
    return path


@needs_shared
def test_ray_run_equals_the_serial_run_number_for_number(tmp_path: Path, ray_local: Any) -> None:
    args = ["--model", str(STORIES), "--text-file", str(TINYSTORIES), "--n-tokens", "8192", "--ctx", "256"]
    args += ["--no-png", "--no-progress"]
    serial = _serial(tmp_path, *args)
    out = tmp_path / "ray"
    assert main(["run", *args, "--executor", "ray", "--workers", "2", "--out", str(out)]) == 0
    ray_path = out / serial.name
    assert comparable(ray_path) == comparable(serial)
    meta = load_results(ray_path)["metadata"]["executor"]
    assert meta["name"] == "ray" and meta["workers"] == 2
    assert load_results(serial)["metadata"]["executor"] == {"name": "serial"}


def test_every_stage_on_ray_equals_serial(tmp_path: Path, ray_local: Any) -> None:
    """K sweep, clustering, per-layer PCA and random subspaces on the embedded model (no ../shared)."""
    serial = _serial(tmp_path, *SMALL)
    out = tmp_path / "ray"
    assert main(["run", *SMALL, "--executor", "ray", "--workers", "2", "--out", str(out)]) == 0
    assert comparable(out / serial.name) == comparable(serial)
    data = load_results(out / serial.name)
    evaluated = data["timings"]["runs"][0]["evaluated"]
    assert len(evaluated) == len(set(evaluated)) == data["status"]["points_total"]


def killing_executor(**kw: Any) -> Any:
    """A Ray executor that kills every worker process after the second row of the first long sweep."""
    from qk_subspace.execution.ray_executor import RayExecutor

    class Killing(RayExecutor):
        killed: ClassVar[list[int]] = []

        def map(self, model: Any, job: Any, plans: Any, *, progress: bool = False) -> Iterator[Any]:
            self._start(model)
            pids = self.worker_pids()
            for i, item in enumerate(super().map(model, job, plans, progress=progress)):
                if i == 1 and len(plans) > 4 and not self.killed:
                    for pid in pids:  # one is busy with a point (retried), one idle (restarted)
                        os.kill(pid, signal.SIGKILL)
                    self.killed.extend(pids)
                yield item

    return Killing(**kw)


def test_a_killed_worker_is_restarted_and_its_point_retried(tmp_path: Path, ray_local: Any) -> None:
    serial = _serial(tmp_path, *SMALL)
    cfg = qs.ExperimentConfig().replace(
        n_tokens=8192, ctx=128, baselines=True, groupby="layer", png=False, progress=False
    )
    ex = killing_executor(workers=2)
    try:
        res = run_experiment("stories260K", tmp_path / "ray", cfg, executor=ex, write_report=False)
        assert len(ex.killed) == 2
        assert set(ex.worker_pids()).isdisjoint(ex.killed)  # both workers are new processes
    finally:
        ex.close()
    assert comparable(res.path) == comparable(serial)
    data = load_results(res.path)
    evaluated = data["timings"]["runs"][0]["evaluated"]
    assert len(evaluated) == len(set(evaluated)) == data["status"]["points_total"]  # every point once


def test_a_failing_point_fails_the_run_once_without_retries(tmp_path: Path, ray_local: Any) -> None:
    from qk_subspace.execution.ray_executor import RayExecutor

    model = qs.load_model("stories260K")
    rep = qs.representations.get("qk")
    heads = rep.heads(model)
    plans = topk_plans(qs.HeadPCA().fit(heads), [1, 2])
    calls = tmp_path / "calls.txt"

    def inside(model: Any, plan: Any) -> dict[str, Any]:
        with open(calls, "a") as fh:
            fh.write(plan.label + "\n")
        if plan.columns["K"] == 2:
            raise ValueError("this point is broken")
        return {}

    with RayExecutor(workers=1) as ex, pytest.raises(ValueError, match="this point is broken"):
        run_sweep(model, None, rep, heads, plans, inside=inside, executor=ex, progress=False)
    assert calls.read_text().split() == ["K=1", "K=2"]  # evaluated once each: no retry of K=2


def test_workers_refuse_a_model_edited_after_loading(ray_local: Any) -> None:
    from qk_subspace.execution.ray_executor import RayExecutor
    from qk_subspace.execution.worker import WeightsMismatchError

    model = qs.load_model("stories260K")
    rep = qs.representations.get("qk")
    heads = rep.heads(model)
    plans = topk_plans(qs.HeadPCA().fit(heads), [1])
    toks = torch.randint(0, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    W_Q = model.blocks[0].attn.W_Q
    with (
        qs.ParameterEdit(model, {"blocks.0.attn.W_Q": W_Q.detach() * 2}),  # the driver's model is edited
        RayExecutor(workers=1) as ex,
        pytest.raises(WeightsMismatchError, match="does not hold the weights"),
    ):
        run_sweep(model, toks, rep, heads, plans, executor=ex, progress=False)


def test_a_killed_driver_is_resumed_without_recomputing(tmp_path: Path, ray_local: Any) -> None:
    args = [*SMALL, "--n-tokens", "16384"]
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "qk_subspace.cli", "run", *args, "--executor", "ray", "--workers", "2"]
    cmd += ["--ray-address", "local"]  # its own local Ray instance, whatever else runs on this machine
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    path = out / "exp6_stories260K.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if path.exists():
                status = load_results(path)["status"]
                if status["points_done"] >= 4:
                    break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach 4 points in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
    first = load_results(path)
    assert not first["status"]["complete"]
    before = first["timings"]["runs"][0]["evaluated"]
    cfg = qs.ExperimentConfig().replace(
        n_tokens=16384, ctx=128, baselines=True, groupby="layer", png=False, progress=False, resume=True
    )
    res = run_experiment("stories260K", out, cfg, executor="ray", workers=2, write_report=False)
    data = res.results
    after = data["timings"]["runs"][1]["evaluated"]
    assert data["timings"]["runs"][1]["resumed"] is True
    assert set(before).isdisjoint(after)  # finished points were not recomputed
    assert sorted(before + after) == sorted(set(before + after))
    assert len(before) + len(after) == data["status"]["points_total"] and data["status"]["complete"]
    serial = _serial(tmp_path, *args)
    assert comparable(res.path) == comparable(serial)


def tiny_checkpoints(root: Path, steps: int = 3) -> list[Path]:
    """A tiny attention-only model trained ``steps`` Adam steps on a repeated-sequence task, saved after
    each step as a TransformerLens-native checkpoint."""
    from tests.test_native_checkpoint import hand_forward, plain_checkpoint, save

    cfg, sd = plain_checkpoint(None, seed=3)
    params = {k: v.double().requires_grad_(True) for k, v in sd.items()}
    opt = torch.optim.Adam(params.values(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, cfg["d_vocab"], (16, cfg["n_ctx"] // 2), generator=g)
    batch = torch.cat([half, half], dim=1)
    out = []
    for step in range(1, steps + 1):
        logp = hand_forward(cfg, params, batch).log_softmax(-1)
        loss = -logp[:, :-1].gather(-1, batch[:, 1:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {k: v.detach().float() for k, v in params.items()}
        out.append(save(root / f"step{step}", cfg, state))
    return out


def test_a_series_of_checkpoints_runs_on_ray_with_a_summary(tmp_path: Path, ray_local: Any) -> None:
    ckpts = tiny_checkpoints(tmp_path / "ckpts")
    toks = torch.randint(0, 50, (12, 32), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "series"
    done, skipped = run_models(
        ckpts, out, executor="ray", workers=2, gate=False, tokens=toks, png=False, progress=False
    )
    assert [r.name for r in done] == ["step1", "step2", "step3"] and skipped == []
    for r in done:
        assert r.path.exists() and r.results["status"]["complete"]
        assert r.results["metadata"]["executor"]["name"] == "ray"
    summary = json.loads((out / "series_summary.json").read_text())["series"]
    assert [m["model"] for m in summary["models"]] == ["step1", "step2", "step3"]
    for row, r in zip(summary["models"], done, strict=True):
        assert row["baseline_ppl"] == r.results["baseline"]["ppl"]
        assert row["ratio_at_fraction"][-1]["K"] == r.results["variance"]["n_heads"]
        assert row["ratio_at_fraction"][-1]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert (out / "series_summary.html").exists() and (out / "report.md").exists()
    # the same series serially gives the same numbers
    serial, _ = run_models(ckpts, tmp_path / "serial", gate=False, tokens=toks, png=False, progress=False)
    assert [comparable(a.path) for a in serial] == [comparable(b.path) for b in done]


def test_executor_without_ray_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    rc = main(["run", "--executor", "ray", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImportError, match=r"qk-subspace\[ray\]"):
        qs.run_experiment("stories260K", tmp_path / "o2", executor="ray", n_tokens=1024, ctx=64)
    assert not (tmp_path / "o2").exists()


def test_import_does_not_load_ray() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import qk_subspace, qk_subspace.execution, sys; print('ray' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert out.stdout.strip() == "False"
