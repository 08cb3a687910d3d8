from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main
from tests.conftest import GPT2_TOKENIZER, WIKITEXT, is_html_figure, make_model, requires_shared
from tests.tiny_checkpoint import save_tiny_gpt2, write_text

FIGS = ("exp6a_cumvar", "exp6b_ppl_vs_K", "exp6c_cluster_ppl", "exp6c_cluster_viz")


# ------------------------------------------------------------------------------ pieces
def test_variance_summary_against_numpy() -> None:
    W = qs.qk_matrices(make_model("mha", n_layers=3, n_heads=4))
    pca = qs.HeadPCA().fit(W)
    s = qs.experiment.variance_summary(pca)
    X = W.reshape(12, -1).numpy()
    sv = np.linalg.svd(X - X.mean(0), compute_uv=False)  # independent: singular values of centred data
    ratios = sv**2 / (sv**2).sum()
    cum = np.cumsum(ratios)
    np.testing.assert_allclose(s["top_ratios"], ratios[:3], rtol=1e-10)
    for t in s["thresholds"]:
        assert t["K"] == int(np.argmax(cum >= t["threshold"] - 1e-12)) + 1
        assert t["fraction_of_heads"] == t["K"] / 12
    assert [t["threshold"] for t in s["thresholds"]] == [0.5, 0.8, 0.9, 0.95]
    assert abs(s["top_cumulative"] - cum[2]) < 1e-10 and abs(s["pc12_cumulative"] - cum[1]) < 1e-10
    assert s["n_nonzero_components"] == 11


def test_gate_rule() -> None:
    rows = [{"K": 1, "ratio": 68.3}, {"K": 10, "ratio": 40.3}, {"K": 144, "ratio": 1.0}]
    g = qs.experiment.gate_check(rows)  # the report: K=10 at 40x -> GPT-2 medium skipped
    assert g.passed is False and g.ratio == 40.3 and (g.K, g.threshold) == (10, 1.1)
    assert qs.experiment.gate_check(rows, K=144, threshold=1.1).passed is True
    assert qs.experiment.gate_check(rows, K=10, threshold=50).passed is True
    assert qs.experiment.gate_check(rows, K=10, threshold=40.3).passed is True  # inclusive
    missing = qs.experiment.gate_check(rows, K=32)
    assert missing.passed is None and "not evaluated" in missing.reason
    assert qs.experiment.gate_check({"perplexity_vs_k": rows}).passed is False


def test_default_k_grid() -> None:
    assert tuple(qs.experiment.default_k_grid(144)) == qs.evaluation.sweeps.REPORT_K_GRID
    g = qs.experiment.default_k_grid(40)
    assert g[-1] == 40 and g == sorted(set(g)) and all(1 <= k <= 40 for k in g)


# ---------------------------------------------------------------- text routes (protocol)
def _hf_rows(path: Path) -> list[str]:
    """Rows as the Hugging Face wikitext builder yields them (independent of qs.evaluation.tokens.wikitext2_rows)."""
    with open(path, encoding="utf-8") as fh:
        return [row if row.strip() else "" for row in fh]


def _datasets_route(monkeypatch: pytest.MonkeyPatch, rows: list[str]) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": rows})

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None, **kw: object):
        assert (path, name, split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)


def test_text_file_and_datasets_rows_give_identical_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(
        " \n = Title = \n \n a cat sat on the mat . \n \n\n = = Sub = = \n the dog ran home .\n",
        encoding="utf-8",
    )
    model_dir = save_tiny_gpt2(tmp_path / "m", raw.read_text() + " big small red")
    tok = qs.load_model(model_dir).tokenizer
    _datasets_route(monkeypatch, _hf_rows(raw))
    from_ds = qs.load_wikitext2(tok, n_tokens=None, ctx=4)
    from_file = qs.load_wikitext2(tok, n_tokens=None, ctx=4, text_file=raw)
    assert torch.equal(from_ds, from_file)


@requires_shared
def test_wikitext_routes_identical_287644_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    rows = _hf_rows(WIKITEXT)
    assert len(rows) == 4358 and rows == qs.evaluation.tokens.wikitext2_rows(text_file=WIKITEXT)
    ids = tok("\n\n".join(rows), add_special_tokens=False, verbose=False)["input_ids"]
    assert len(ids) == 287_644
    _datasets_route(monkeypatch, rows)
    from_ds = qs.load_wikitext2(tok)  # the default protocol: 200,000 -> 195 x 1024
    assert from_ds.shape == (195, 1024) and from_ds.flatten().tolist() == ids[: 195 * 1024]
    assert torch.equal(from_ds, qs.load_wikitext2(tok, text_file=WIKITEXT))


# ------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiny")
    text = write_text(d / "stories.txt", n_words=3000)
    return save_tiny_gpt2(d / "tiny-gpt2", text.read_text()), text


def test_cli_end_to_end_writes_json_figures_report(
    tiny_dir, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_dir, text = tiny_dir
    out = tmp_path / "out"
    rc = main(
        [
            "run",
            "--model",
            str(model_dir),
            "--text-file",
            str(text),
            "--n-tokens",
            "1024",
            "--ctx",
            "64",
            "--ks",
            "0,2,5",
            "--cluster-ks",
            "2,4,8,64",
            "--n-dims",
            "4",
            "--gate-k",
            "2",
            "--n-boot",
            "200",
            "--out",
            str(out),
            "--no-png",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads((out / "exp6_tiny-gpt2.json").read_text())
    sections = (
        "schema_version status metadata variance baseline perplexity_vs_k clustering pca_map checks gate"
    )
    assert list(data) == [*sections.split(), "timings"]
    meta = data["metadata"]
    for key in (
        "model",
        "model_source",
        "processing",
        "protocol",
        "n_tokens",
        "seeds",
        "package_versions",
        "grids",
    ):
        assert key in meta
    assert (
        meta["protocol"]["n_chunks"] == 16
        and meta["n_tokens"] == 1024
        and meta["protocol"]["route"] == "plain text file"
    )
    assert meta["grids"]["K"] == [0, 2, 5, 8]  # K = all (8) added
    assert meta["grids"]["cluster_k"] == [2, 4] and meta["grids"]["cluster_k_dropped"] == [8, 64]
    assert data["status"] == {"complete": True, "points_done": 7, "points_total": 7}
    assert {"started", "finished", "wall_s"} <= set(data["timings"]["runs"][0])
    rows = data["perplexity_vs_k"]
    assert [r["K"] for r in rows] == [0, 2, 5, 8]
    for r in rows:
        assert {
            "K",
            "cumulative_variance",
            "ppl",
            "ratio",
            "ratio_low",
            "ratio_high",
            "max_residual",
            "is_all",
        } <= set(r)
        assert r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
        assert abs(r["ratio"] - r["ppl"] / data["baseline"]["ppl"]) < 1e-12
    assert data["checks"]["k_all"]["ok"] and abs(data["checks"]["k_all"]["ratio"] - 1) < 1e-5
    assert rows[0]["ratio"] != 1.0  # the tiny model's attention matters: edits change perplexity
    cl = data["clustering"]
    assert [(r["k"], r["replaced"]) for r in cl["rows"]] == [(2, 6), (4, 4)]
    assert set(cl["assignments"]) == {"2", "4"} and np.array(cl["assignments"]["4"]).shape == (2, 4)
    assert len(cl["representatives"]["4"]) == 4
    pm = data["pca_map"]
    assert len(pm) == 8 and {"pc1", "pc2", "layer", "head", "label", "cluster"} <= set(pm[0])
    assert [p["cluster"] for p in pm] == [c for row in cl["assignments"]["2"] for c in row]
    assert data["gate"]["K"] == 2 and data["gate"]["passed"] in (True, False)
    assert len(data["baseline"]["nll_per_chunk"]) == 16
    for f in FIGS:
        html = out / f"{f}_tiny-gpt2.html"
        assert is_html_figure(html) and html.stat().st_size < 200_000  # plotly.js is not embedded
    report = (out / "report.md").read_text()
    assert "## 2. Perplexity vs number of components K (6B)" in report and "reference" not in report
    assert "K=all (8) check" in report
    assert "6B perplexity vs K" in printed and "check K=all" in printed and "OK" in printed


def test_run_experiment_in_memory_model(tmp_path: Path) -> None:
    model = make_model("gqa", n_heads=4, n_kv_heads=2)
    toks = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(0))
    res = qs.run_experiment(
        model,
        tmp_path,
        tokens=toks,
        ks=(0, 2),
        cluster_ks=(2, 3),
        n_dims=3,
        n_boot=100,
        png=False,
        progress=False,
    )
    assert set(res.figures) == {f"{f}_{res.name}" for f in FIGS}
    assert all(isinstance(f, go.Figure) for f in res.figures.values())
    assert res.figures[f"exp6b_ppl_vs_K_{res.name}"].layout.yaxis.type == "log"  # the ratio, full range
    assert tuple(res.figures[f"exp6b_ppl_vs_K_{res.name}"].layout.yaxis2.range) == (0.98, 1.3)  # the zoom
    assert (
        len(res.figures[f"exp6c_cluster_viz_{res.name}"].data) == model.cfg.n_layers + 2
    )  # per layer, per cluster
    t = res.tables()
    assert list(t["perplexity_vs_k"]["K"]) == [0, 2, 8] and list(t["clustering"]["k"]) == [2, 3]
    assert res.results["metadata"]["protocol"]["route"] == "tokens"
    # the baseline equals a hand-written float64 cross-entropy on the model's logits
    with torch.no_grad():
        logits = model(toks).double()
    logp = logits[:, :-1] - torch.logsumexp(logits[:, :-1], dim=-1, keepdim=True)
    ref_nll = -torch.gather(logp, -1, toks[:, 1:, None]).squeeze(-1).mean(dim=1).numpy()
    np.testing.assert_allclose(res.results["baseline"]["nll_per_chunk"], ref_nll, rtol=1e-6)
    assert (
        abs(res.results["baseline"]["ppl"] - np.exp(ref_nll.mean())) < 1e-5 * res.results["baseline"]["ppl"]
    )
    # independent check of one point
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    with qs.inject_qk(model, pca.reconstruct(2)):
        assert qs.perplexity(model, toks, progress=False).ppl == res.results["perplexity_vs_k"][1]["ppl"]
    # validation before any evaluation
    # the default n_dims (20) fits every model: clipped to the PCA's 8 components, and recorded
    res = qs.run_experiment(
        model, tmp_path / "x", tokens=toks, ks=(0,), cluster_ks=(2,), progress=False, png=False
    )
    clustering = res.results["metadata"]["clustering"]
    assert (clustering["n_dims"], clustering["n_dims_requested"]) == (8, None)
    with pytest.raises(ValueError, match=r"n_dims \(--n-dims\) must be in \[1, 8\].*got 20"):
        qs.run_experiment(model, tmp_path / "z", tokens=toks, ks=(0,), n_dims=20, progress=False, png=False)
    assert not (tmp_path / "z").exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"ks \(--ks\) must be in \[0, 8\]"):
        qs.run_experiment(model, tmp_path / "y", tokens=toks, ks=(9,), cluster_ks=(2,), n_dims=3, png=False)


def test_report_shows_reference_numbers_only_for_gpt2(tmp_path: Path) -> None:
    model = make_model("mha")
    toks = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    res = qs.run_experiment(
        model, tmp_path, tokens=toks, ks=(1,), cluster_ks=(4,), n_dims=3, n_boot=50, png=False, progress=False
    )
    plain = qs.report.render_report([res.results])
    assert "2034.3" not in plain and "reference" not in plain
    fake = json.loads(json.dumps(res.results))
    fake["metadata"].update(model="gpt2", model_source="gpt2")
    fake["metadata"]["model_config"].update(n_layers=12, n_heads=12, d_head=64)
    fake["perplexity_vs_k"][0]["K"] = 10
    text = qs.report.render_report([fake])
    assert "not results of this run" in text and "(reference)" in text
    assert "| 10 |" in text and "52.0% | 1200.9 | 40.3x" in text  # the report's K=10 row beside ours
    assert "| 4 | 4 |" in text and "140 | 1351.9 | 45.4x" in text
    assert qs.report.REFERENCE_GPT2_SMALL["variance_thresholds"][0.9] == 82


def test_run_models_applies_the_gate(tmp_path: Path) -> None:
    a, b = make_model("mha", seed=1), make_model("mha", seed=2)
    a.cfg.model_name, b.cfg.model_name = "small", "medium"
    toks = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    kw = {
        "ks": (1,),
        "cluster_ks": (4,),
        "n_dims": 3,
        "n_boot": 50,
        "png": False,
        "progress": False,
        "gate_k": 1,
    }
    done, skipped = qs.run_models([a, b], tmp_path / "fail", tokens=toks, gate_threshold=1e-3, **kw)
    assert [r.name for r in done] == ["small"] and [s[0] for s in skipped] == ["medium"]
    assert done[0].gate.passed is False
    report = (tmp_path / "fail" / "report.md").read_text()
    assert "Skipped by the gate" in report and "medium" in report
    assert not (tmp_path / "fail" / "exp6_medium.json").exists()
    done, skipped = qs.run_models([a, b], tmp_path / "pass", tokens=toks, gate_threshold=1e3, **kw)
    assert [r.name for r in done] == ["small", "medium"] and skipped == []


def test_cli_arguments_map_to_config_fields() -> None:
    from qk_subspace.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "run",
            "--model",
            "gpt2",
            "gpt2-medium",
            "--ks",
            "1,3",
            "10",
            "--cluster-ks",
            "4,8",
            "--n-tokens",
            "all",
            "--ctx",
            "512",
            "--seed",
            "3",
            "--no-png",
            "--resume",
            "--gate-threshold",
            "1.2",
        ]
    )
    cfg = config_from_args(args)
    assert args.model == ["gpt2", "gpt2-medium"]
    assert (cfg.sweeps.ks, cfg.sweeps.cluster_ks, cfg.text.n_tokens, cfg.text.ctx, cfg.sweeps.seed) == (
        (1, 3, 10),
        (4, 8),
        None,
        512,
        3,
    )
    assert (cfg.run.png, cfg.run.resume, cfg.sweeps.gate_threshold, cfg.sweeps.gate_k, cfg.sweeps.n_dims) == (
        False,
        True,
        1.2,
        10,
        None,  # the default: 20, clipped to the PCA's components
    )
    assert cfg.value("n_dims") is None and cfg.flat()["ks"] == (1, 3, 10)
    default = config_from_args(build_parser().parse_args(["run", "--model", "gpt2"]))
    assert default == qs.ExperimentConfig()  # CLI defaults = the report's protocol
    assert main(["run", "--model", "gpt2", "--ks", "1,x"]) == 2
