"""Resumable runs (atomic per-point writes, --resume with a configuration check) and determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qk_subspace as qs
from qk_subspace.cli import main
from qk_subspace.experiment.store import TIMINGS_KEY, atomic_write_json, without_timings
from tests.tiny_checkpoint import tiny_cli_setup

ROOT = Path(__file__).resolve().parents[1]
KS = "0,2,4,6"
CLUSTER_KS = "2,4,6"
N_POINTS = 1 + 5 + 3  # baseline + K grid (+ 8 = all) + cluster counts


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("resume")
    model, text, args = tiny_cli_setup(
        d, 3000, n_tokens=1024, ctx=64, ks=KS, cluster_ks=CLUSTER_KS, n_dims=4, n_boot=100
    )
    ref = d / "reference"
    assert main([*args, "--out", str(ref)]) == 0  # an uninterrupted run
    return {"args": args, "ref": ref / "exp6_tiny.json", "model": model, "text": text}


def _results(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_inputs_give_byte_identical_json_except_timings(setup: dict, tmp_path: Path) -> None:
    assert main([*setup["args"], "--out", str(tmp_path)]) == 0
    a, b = setup["ref"].read_text(), (tmp_path / "exp6_tiny.json").read_text()
    assert a != b  # the clock differs ...
    assert without_timings(a) == without_timings(b)  # ... and nothing else, byte for byte
    assert without_timings(a).encode() == without_timings(b).encode()
    da, db = _results(setup["ref"]), _results(tmp_path / "exp6_tiny.json")
    assert list(da)[-1] == TIMINGS_KEY and da["timings"] != db["timings"]
    da.pop(TIMINGS_KEY), db.pop(TIMINGS_KEY)
    assert da == db and da["status"]["complete"]


def test_sigkill_mid_sweep_then_resume_equals_uninterrupted(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = out / "exp6_tiny.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qk_subspace.cli", *setup["args"], "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                st = _results(path)["status"]  # always a complete JSON document (atomic writes)
                if 3 <= st["points_done"] < N_POINTS:
                    proc.send_signal(signal.SIGKILL)
                    seen = st["points_done"]
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and seen is None:
            proc.kill()
        proc.wait()
    assert seen is not None, "the run finished before it could be killed in the middle of the sweep"
    assert proc.returncode == -signal.SIGKILL
    killed = _results(path)  # the file survived the kill intact
    done_before = killed["status"]["points_done"]
    assert seen <= done_before < N_POINTS and not killed["status"]["complete"]
    assert "finished" not in killed["timings"]["runs"][0]

    assert main([*setup["args"], "--out", str(out), "--resume"]) == 0
    resumed_text = path.read_text()
    assert without_timings(resumed_text) == without_timings(setup["ref"].read_text())
    runs = _results(path)["timings"]["runs"]
    assert [r["resumed"] for r in runs] == [False, True]
    first, second = runs[0]["evaluated"], runs[1]["evaluated"]
    assert len(first) == done_before and len(second) == N_POINTS - done_before  # finished points were skipped
    assert not set(first) & set(second) and len(set(first) | set(second)) == N_POINTS
    assert not list(out.glob(".exp6_tiny.json.*.tmp"))


def test_resume_refuses_a_different_configuration(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "exp6_tiny.json"
    path.write_bytes(setup["ref"].read_bytes())
    before = path.read_bytes()
    for change, needle in [
        (["--seed", "1"], "seeds.kmeans"),
        (["--n-tokens", "2048"], "tokens_sha256"),
        (["--batch-size", "4"], "evaluation.batch_size"),
    ]:
        assert main([*setup["args"], *change, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "different configuration" in err and needle in err and "refusing" in err
        assert path.read_bytes() == before  # never overwritten
    args = list(setup["args"])
    args[args.index("--ks") + 1] = "0,2,4"
    assert main([*args, "--out", str(out), "--resume"]) == 2
    assert "grids.K" in capsys.readouterr().err and path.read_bytes() == before
    # package versions are part of the configuration
    data = _results(path)
    data["metadata"]["package_versions"]["torch"] = "0.0.1"
    atomic_write_json(path, data)
    assert main([*setup["args"], "--out", str(out), "--resume"]) == 2
    assert "package_versions.torch: on disk '0.0.1'" in capsys.readouterr().err
    with pytest.raises(qs.experiment.ConfigMismatchError, match="different configuration"):
        qs.run_experiment(
            setup["model"],
            out,
            resume=True,
            text_file=str(setup["text"]),
            n_tokens=1024,
            ctx=64,
            batch_size=16,
            ks=(0, 2, 4, 6),
            cluster_ks=(2, 4, 6),
            n_dims=4,
            gate_k=2,
            n_boot=100,
        )


def test_existing_results_are_never_overwritten_without_a_flag(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "exp6_tiny.json"
    path.write_bytes(setup["ref"].read_bytes())
    assert main([*setup["args"], "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err and path.read_bytes() == setup["ref"].read_bytes()
    # resuming a complete run evaluates nothing and reproduces the file (up to timings)
    assert main([*setup["args"], "--out", str(tmp_path), "--resume"]) == 0
    data = _results(path)
    assert data["timings"]["runs"][-1]["evaluated"] == []
    assert without_timings(path.read_text()) == without_timings(setup["ref"].read_text())
