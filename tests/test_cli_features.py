"""End-to-end runner/CLI wiring of diagnostics, importance order and OV circuits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main
from qk_subspace.experiment.inputs import sha256_tokens
from qk_subspace.experiment.store import TIMINGS_KEY, atomic_write_json, without_timings
from tests.conftest import is_html_figure, make_model
from tests.tiny_checkpoint import tiny_cli_setup

N_TOKENS, CTX = 1024, 32
DIAG = ("--diagnostics", "--diag-seqs", "4", "--diag-ctx", "32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("features")
    model_dir, text, base = tiny_cli_setup(
        d, 3000, n_tokens=N_TOKENS, ctx=CTX, ks="0,2", cluster_ks="2,4",
        n_dims=4, n_boot=100,
    )  # fmt: skip
    model = qs.load_model(model_dir, dtype=torch.float32)
    stream = qs.chunk_text(model.tokenizer, text.read_text(), None, 2).flatten()
    return {"base": base, "model": model, "stream": stream, "dir": d}


def _run(tiny: dict, out: Path, *extra: str) -> dict:
    assert main([*tiny["base"], *extra, "--out", str(out)]) == 0
    return json.loads((out / "exp6_tiny.json").read_text())


def test_diagnostics_per_head_rows_per_k_and_figures(tiny: dict, tmp_path: Path) -> None:
    data = _run(tiny, tmp_path, *DIAG, "--no-head-scores")
    model, n = tiny["model"], 8
    meta = data["metadata"]["diagnostics"]
    # the diagnostic batch is the 4 x 32 tokens right after the perplexity tokens
    diag = tiny["stream"][N_TOKENS : N_TOKENS + 128].reshape(4, 32)
    assert meta["tokens_sha256"] == sha256_tokens(diag) and meta["offset"] == N_TOKENS
    assert meta["head_scores"] is False
    rows = pd.DataFrame(data["attention_diagnostics"]["rows"])
    assert sorted(rows["K"].unique()) == [0, 2, n]
    for _, sub in rows.groupby("K"):
        assert sorted(zip(sub["layer"], sub["head"], strict=False)) == [
            (layer, h) for layer in range(2) for h in range(4)
        ]
    assert "induction_orig" not in rows.columns  # --no-head-scores
    at_all = rows[rows["K"] == n]
    assert at_all["kl"].max() < 1e-6 and at_all["js"].max() < 1e-6 and (at_all["top1_agreement"] == 1).all()
    assert at_all["output_change_write"].max() < 1e-5
    assert data["checks"]["diagnostics_k_all"]["max_kl"] < 1e-6
    # same numbers as an independent call of the library on that batch
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)
    ref = qs.attention_diagnostics(model, diag, target=pca.reconstruct(0).float(), head_scores=False)
    got = rows[rows["K"] == 0].sort_values(["layer", "head"])
    np.testing.assert_allclose(got["kl"].to_numpy(), ref["kl"].to_numpy(), rtol=1e-6, atol=1e-9)
    assert got["kl"].max() > 1e-3  # K=0 changes patterns of this model
    ch = qs.evaluation.head_outputs.head_output_change(
        model, diag, lambda: qs.inject_qk(model, pca.reconstruct(0).float()), progress=False
    )
    np.testing.assert_allclose(got["output_change_write"].to_numpy(), ch["write"].flatten(), rtol=1e-5)
    # per-K summary columns in the sweep rows
    assert {"diag_mean_kl", "diag_max_kl", "diag_max_kl_head"} <= set(data["perplexity_vs_k"][0])
    for name in (
        "diag_kl_heatmap",
        "diag_layer_kl_vs_K",
        "diag_output_change_heatmap",
        "diag_breaking_heads",
    ):
        assert is_html_figure(tmp_path / f"{name}_tiny.html")
    assert "## Attention diagnostics" in (tmp_path / "report.md").read_text()


def test_order_importance_writes_orderings_sweep_and_overlay(tiny: dict, tmp_path: Path) -> None:
    data = _run(
        tiny,
        tmp_path,
        "--order",
        "importance",
        "--importance-method",
        "gradient",
        "--importance-tokens",
        "512",
    )
    model = tiny["model"]
    imp = data["importance"]
    assert imp["method"] == "gradient" and imp["score"] == "fisher" and imp["n_tokens"] == 16 * 31
    rank = tiny["stream"][N_TOKENS : N_TOKENS + 512].reshape(16, 32)  # no diagnostics: right after
    assert data["metadata"]["importance"]["tokens_sha256"] == sha256_tokens(rank)
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    ref = qs.component_importance(model, pca, rank, method="gradient", progress=False)
    assert imp["order"] == qs.evaluation.importance.importance_order(ref)
    assert imp["variance_order"] == list(range(pca.n_components_))
    rows = data["perplexity_vs_k_importance"]
    assert [r["K"] for r in rows] == [0, 2, 8]
    assert abs(rows[-1]["ratio"] - 1) < 1e-5 and data["checks"]["k_all_importance"]["ok"]
    # K=2 keeps the two most important components: check against a direct injection
    kept = imp["order"][:2]
    with qs.inject_qk(model, pca.reconstruct(components=kept).float()):
        toks = tiny["stream"][:N_TOKENS].reshape(-1, CTX)
        ppl = qs.perplexity(model, toks, progress=False).ppl
    assert abs(rows[1]["ppl"] - ppl) <= 1e-6 * ppl
    assert rows[1]["n_components"] == 2
    assert data["status"] == {"complete": True, "points_done": 1 + 3 + 2 + 1 + 3, "points_total": 10}
    assert is_html_figure(tmp_path / "importance_overlay_tiny.html")
    assert "## Importance-ordered compression" in (tmp_path / "report.md").read_text()


def test_circuit_ov_sweep_clustering_and_diagnostics(tiny: dict, tmp_path: Path) -> None:
    data = _run(tiny, tmp_path, "--circuit", "ov", *DIAG, "--no-head-scores")
    model = tiny["model"]
    assert data["metadata"]["circuit"] == "ov"
    assert data["checks"]["k_all"]["ok"] and abs(data["checks"]["k_all"]["ratio"] - 1) < 1e-5
    W = qs.ov_matrices(model)
    pca = qs.HeadPCA().fit(W)
    assert data["variance"]["explained_variance_ratio"] == pytest.approx(
        pca.explained_variance_ratio_.tolist()
    )
    toks = tiny["stream"][:N_TOKENS].reshape(-1, CTX)
    base = qs.perplexity(model, toks, progress=False)
    cl = qs.cluster_heads(pca, 2, n_dims=4, seed=0)
    with qs.inject_ov(model, cl.target(W).float(), heads=torch.as_tensor(cl.replaced_mask)):
        ppl = qs.perplexity(model, toks, progress=False).ppl
    row = next(r for r in data["clustering"]["rows"] if r["k"] == 2)
    assert abs(row["ppl"] - ppl) <= 1e-6 * ppl and abs(row["ratio"] - ppl / base.ppl) < 1e-6
    assert row["ratio"] != 1.0  # OV clustering did change the model
    diag = pd.DataFrame(data["attention_diagnostics"]["rows"])
    assert diag[diag["layer"] == 0]["kl"].abs().max() == 0.0  # OV edits leave layer 0's patterns alone
    k0 = diag[diag["K"] == 0]
    assert k0["output_change_write"].min() > 1e-3  # ... but change every head's output
    assert diag[diag["K"] == 8]["output_change_write"].max() < 1e-5
    report = (tmp_path / "report.md").read_text()
    assert "W_OV = W_V.T @ W_O.T" in report and "W_QK" not in report


def test_resume_keeps_finished_points_of_new_sections_and_refuses_changed_options(
    tiny: dict, tmp_path: Path
) -> None:
    extra = (
        *DIAG,
        "--no-head-scores",
        "--order",
        "importance",
        "--importance-method",
        "gradient",
        "--importance-tokens",
        "256",
    )
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    assert _run(tiny, ref_dir, *extra)["status"]["complete"]
    shutil.copytree(ref_dir, out)
    path = out / "exp6_tiny.json"
    cut = json.loads(path.read_text())  # as if killed before K=8 (variance) and K=2 (importance) finished
    cut["perplexity_vs_k"] = [r for r in cut["perplexity_vs_k"] if r["K"] != 8]
    cut["attention_diagnostics"]["rows"] = [r for r in cut["attention_diagnostics"]["rows"] if r["K"] != 8]
    cut["perplexity_vs_k_importance"] = [r for r in cut["perplexity_vs_k_importance"] if r["K"] == 0]
    for key in ("checks", "gate"):
        cut.pop(key)
    atomic_write_json(path, cut)
    before = path.read_text()
    # a changed option refuses and leaves the file alone
    assert main([*tiny["base"], *extra[:-1], "300", "--out", str(out), "--resume"]) == 2
    assert main([*tiny["base"], *extra[len(DIAG) :], "--out", str(out), "--resume"]) == 2  # diagnostics off
    assert path.read_text() == before
    assert _run(tiny, out, *extra, "--resume")["status"]["complete"]
    a, b = (ref_dir / "exp6_tiny.json").read_text(), path.read_text()
    assert without_timings(a) == without_timings(b)
    runs = json.loads(b)[TIMINGS_KEY]["runs"]
    assert runs[-1]["resumed"] and runs[-1]["evaluated"] == ["K=8", "importance K=2", "importance K=8"]


def test_run_experiment_side_tokens_errors(tiny: dict, tmp_path: Path) -> None:
    model = make_model("gqa", n_heads=4, n_kv_heads=2)
    toks = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="diag_tokens"):
        qs.run_experiment(
            model, tmp_path, tokens=toks, ks=(0,), cluster_ks=(), diagnostics=True, progress=False
        )
    res = qs.run_experiment(
        model,
        tmp_path,
        tokens=toks,
        ks=(0,),
        cluster_ks=(),
        n_boot=50,
        progress=False,
        png=False,
        diagnostics=True,
        diag_tokens=toks[:2, :8],
        head_scores=False,
        order="importance",
        rank_tokens=toks[:2],
        importance_method="drop_one",
        circuit="ov",
    )
    assert res.results["metadata"]["diagnostics"]["source"] == "tokens given by the caller"
    imp = res.results["importance"]
    assert imp["method"] == "drop_one" and imp["score"] == "delta_nll" and imp["circuit"] == "ov"
    deltas = {c["component"]: c["delta_nll"] for c in imp["components"]}
    assert [deltas[c] for c in imp["order"]] == sorted(deltas.values(), reverse=True)
    assert res.results["checks"]["k_all_importance"]["ok"] and res.results["checks"]["k_all"]["ok"]
    with pytest.raises(ValueError, match="n-tokens"):  # no text left after the perplexity tokens
        qs.run_experiment(
            tiny["model"],
            tmp_path / "x",
            text_file=tiny["base"][4],
            n_tokens=None,
            ctx=CTX,
            ks=(0,),
            cluster_ks=(),
            diagnostics=True,
            diag_seqs=4,
            diag_ctx=32,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"diag-ctx.*n_ctx=64"):  # checked before any evaluation
        qs.run_experiment(
            tiny["model"],
            tmp_path / "y",
            text_file=tiny["base"][4],
            n_tokens=N_TOKENS,
            ctx=CTX,
            ks=(0,),
            cluster_ks=(),
            diagnostics=True,
            diag_seqs=1,
            diag_ctx=128,
            progress=False,
        )
    assert not (tmp_path / "y" / "exp6_tiny.json").exists()
    with pytest.raises(ValueError, match="circuit"):
        qs.ExperimentConfig().replace(circuit="vo")
