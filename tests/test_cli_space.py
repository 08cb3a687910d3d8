"""End-to-end runner/CLI wiring of --space, --groupby layer, --baselines, --gauges."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main
from qk_subspace.experiment.store import TIMINGS_KEY, atomic_write_json, without_timings
from tests.tiny_checkpoint import tiny_cli_setup

N_TOKENS, CTX, N_HEADS = 512, 32, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model_dir, text, base = tiny_cli_setup(
        tmp_path_factory.mktemp("space"), 2000, n_tokens=N_TOKENS, ctx=CTX, ks="0,2", cluster_ks="2", n_dims=3,
        n_boot=50,
    )  # fmt: skip
    return {"base": base, "dir": model_dir, "text": text}


def _run(tiny: dict, out: Path, *extra: str) -> dict:
    assert main([*tiny["base"], *extra, "--out", str(out)]) == 0
    return json.loads((out / "exp6_tiny.json").read_text())


def test_space_circuit_k_all_ratio_one_residual_and_clustering(tiny: dict, tmp_path: Path) -> None:
    data = _run(tiny, tmp_path, "--space", "circuit")
    assert data["metadata"]["space"] == "circuit" and data["status"]["complete"]
    rows = {r["K"]: r for r in data["perplexity_vs_k"]}
    assert sorted(rows) == [0, 2, N_HEADS]
    assert abs(rows[N_HEADS]["ratio"] - 1.0) < 1e-5 and data["checks"]["k_all"]["ok"]
    assert all(r["space"] == "circuit" and "mean_residual" in r for r in rows.values())
    # GPT-2 heads: d_head < d_model, so every circuit is realisable through W_Q at K = all
    assert rows[N_HEADS]["max_residual"] < 1e-6
    assert rows[0]["ratio"] > rows[N_HEADS]["ratio"]
    # variance equals an independent PCA of the materialised circuits (float64)
    model = qs.load_model(tiny["dir"], dtype=torch.float32)  # the run's dtype; circuits formed in float64
    C = torch.einsum("lhmd,lhnd->lhmn", model.W_Q.double(), model.W_K.double()).reshape(N_HEADS, -1).double()
    s = torch.linalg.svdvals(C - C.mean(0))
    ref = torch.cumsum(s**2, 0) / (s**2).sum()
    got = torch.tensor(data["variance"]["cumulative_variance"], dtype=torch.float64)
    assert torch.allclose(got[: len(ref)], ref[: len(got)], atol=1e-8)
    assert data["variance"]["n_features"] == model.cfg.d_model**2
    # clustering in circuit space: representatives replace their clusters
    cl = data["clustering"]["rows"]
    assert [r["k"] for r in cl] == [2] and cl[0]["replaced"] == N_HEADS - 2 and cl[0]["ratio"] > 0
    assert data["checks"]["pca_reconstruction_max_abs_error"] is None
    report = (tmp_path / "report.md").read_text()
    assert "## PCA space" in report and "circuit" in report


def test_space_canonical_k_all_ratio_one(tiny: dict, tmp_path: Path) -> None:
    data = _run(tiny, tmp_path, "--space", "canonical")
    rows = {r["K"]: r for r in data["perplexity_vs_k"]}
    assert abs(rows[N_HEADS]["ratio"] - 1.0) < 1e-5 and data["checks"]["k_all"]["ok"]
    assert data["checks"]["pca_reconstruction_max_abs_error"] < 1e-8
    assert len(data["clustering"]["rows"]) == 1


def test_groupby_layer_writes_per_layer_sweep_and_comparison(tiny: dict, tmp_path: Path) -> None:
    data = _run(tiny, tmp_path, "--groupby", "layer", "--ks", "0,1,2,6")
    lw = data["layerwise"]
    # K clipped to the 4 heads per layer (6 -> 4), which is always evaluated
    assert [r["K"] for r in lw["per_layer"]] == [0, 1, 2, 4] == data["metadata"]["grids"]["K_layer"]
    assert all(r["groupby"] == "layer" for r in lw["per_layer"])
    assert abs(lw["per_layer"][-1]["ratio"] - 1.0) < 1e-5 and data["checks"]["k_all_layerwise"]["ok"]
    D, n, L = 8 * 8, N_HEADS, 2
    for p in lw["matched"]:
        kg, kl = p["K_global"], p["K_layer"]
        assert qs.decomposition.storage.pca_parameter_count(
            kg, D, n
        ) <= qs.decomposition.storage.pca_parameter_count(kl, D, n, L)
        assert kg == N_HEADS or qs.decomposition.storage.pca_parameter_count(
            kg + 1, D, n
        ) > qs.decomposition.storage.pca_parameter_count(kl, D, n, L)
    assert sorted(r["K"] for r in lw["global"]) == sorted({p["K_global"] for p in lw["matched"]})
    assert all(r["groupby"] == "none" for r in lw["global"])
    assert (tmp_path / "layerwise_tiny.html").is_file()
    assert "## Per-layer PCA vs global PCA" in (tmp_path / "report.md").read_text()
    # main pipeline stays global
    assert sorted(r["K"] for r in data["perplexity_vs_k"]) == [0, 1, 2, 6, N_HEADS]


def test_baselines_write_nulls_random_rows_and_figure(tiny: dict, tmp_path: Path) -> None:
    data = _run(tiny, tmp_path, "--space", "circuit", "--baselines", "--baseline-seeds", "2", "--ks", "0,2,4")
    bl = data["baselines"]
    nulls = pd.DataFrame(bl["spectrum_nulls"])
    assert {"real", "shuffled", "gaussian", "random_subspace"} <= set(nulls["curve"])
    real = nulls[nulls["curve"] == "real"]["cumulative_variance"].to_numpy()
    assert abs(real[0] - data["variance"]["cumulative_variance"][0]) < 1e-12
    rand = pd.DataFrame(bl["random_subspace"])
    assert sorted(set(rand["K"])) == [2, 4] == data["metadata"]["grids"]["K_random"]
    assert (rand.groupby("K").size() == 2).all() and (rand["variance"] <= 1 + 1e-12).all()
    # a random K-dim subspace keeps no more variance than the top-K principal components
    cum = data["variance"]["cumulative_variance"]
    assert all(r["variance"] <= cum[r["K"] - 1] + 1e-9 for r in bl["random_subspace"])
    assert [r["K"] for r in bl["summary"]] == [2, 4]
    assert (tmp_path / "baselines_tiny.html").is_file()
    assert "## Null baselines" in (tmp_path / "report.md").read_text()


def test_resume_skips_finished_points_and_refuses_changed_space(tiny: dict, tmp_path: Path) -> None:
    extra = ("--groupby", "layer", "--baselines", "--baseline-seeds", "2", "--cluster-ks", "2")
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    assert _run(tiny, ref_dir, *extra)["status"]["complete"]
    shutil.copytree(ref_dir, out)
    path = out / "exp6_tiny.json"
    cut = json.loads(path.read_text())  # as if killed during the baselines
    cut["layerwise"]["global"] = cut["layerwise"]["global"][:-1]
    cut["baselines"]["random_subspace"] = [r for r in cut["baselines"]["random_subspace"] if r["K"] != 2]
    for key in ("checks", "gate"):
        cut.pop(key)
    atomic_write_json(path, cut)
    before = path.read_text()
    assert main([*tiny["base"], *extra, "--space", "circuit", "--out", str(out), "--resume"]) == 2
    assert main([*tiny["base"], *extra[2:], "--out", str(out), "--resume"]) == 2  # --groupby dropped
    assert path.read_text() == before
    assert _run(tiny, out, *extra, "--resume")["status"]["complete"]
    a, b = (ref_dir / "exp6_tiny.json").read_text(), path.read_text()
    assert without_timings(a) == without_timings(b)
    evaluated = json.loads(b)[TIMINGS_KEY]["runs"][-1]["evaluated"]
    assert (
        evaluated[-1] == "random K=2" and len(evaluated) == 2 and evaluated[0].startswith("matched global K=")
    )


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--space", "circuit", "--circuit", "ov"), ["--space circuit", "--circuit ov"]),
        (("--baselines", "--circuit", "ov"), ["--baselines", "--circuit ov"]),
        (("--space", "canonical", "--order", "importance"), ["--order importance", "--space canonical"]),
        (("--space", "circuit", "--diagnostics"), ["--diagnostics", "--space circuit"]),
        (("--baseline-seeds", "0", "--baselines"), ["baseline_seeds"]),
    ],
)
def test_unsupported_combinations_refuse_before_writing(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], words: list[str]
) -> None:
    out = tmp_path / "out"
    assert main([*tiny["base"], *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()


def test_gauges_study_section_and_figure(tiny: dict, tmp_path: Path) -> None:
    data = _run(tiny, tmp_path, "--gauges", "1", "--ks", "0,2", "--cluster-ks", "2")
    gs = data["gauge_study"]
    assert gs["baseline_ok"] and data["checks"]["gauge_baseline"]["ok"]
    t = pd.DataFrame(gs["table"])
    assert set(t["space"]) == {"raw", "circuit"} and set(t["gauge"]) == {0, 1}
    circ = t[t["space"] == "circuit"].pivot(index="K", columns="gauge", values="cumulative_variance")
    assert (circ[0] - circ[1]).abs().max() < 1e-6  # circuit space is gauge-invariant
    assert (tmp_path / "gauge_tiny.html").is_file()
