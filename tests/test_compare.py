"""qs.compare_spaces and `qk-subspace compare`: curves, invariance, stored values, files, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main
from qk_subspace.decomposition.storage import pca_parameter_count
from qk_subspace.evaluation.compare import compare_spaces, default_compare_ks
from qk_subspace.experiment.store import without_timings
from tests.conftest import SHARED_DATA, make_model

REQUIRED = {"space", "K", "ratio", "stored_values", "gauge", "curve", "residual_total"}


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_invariant_curve_is_fixed_by_gauges_and_raw_is_not(kind: str, tokens: torch.Tensor) -> None:
    shape = {"n_heads": 4, "n_kv_heads": 2} if kind == "gqa" else {}
    model = make_model(kind, dtype=torch.float64, **shape)  # type: ignore[arg-type]
    res = compare_spaces(model, tokens, ks=[2, 5], gauges=2, seeds=2, progress=False, n_boot=50)
    t = res.table
    assert set(t.columns) >= REQUIRED
    assert set(t["curve"]) == {"raw", "canonical", "circuit", "random"}
    assert sorted(t[(t["curve"] == "raw") & (t["gauge"] == 0)]["K"]) == [0, 2, 5, 8]
    assert set(t[t["curve"] == "circuit"]["gauge"]) == {0, 1, 2}
    for curve in ("raw", "canonical", "circuit"):
        k_all = t[(t["curve"] == curve) & (t["K"] == 8)]
        np.testing.assert_allclose(k_all["ratio"], 1.0, rtol=0, atol=1e-9)
    circ = t[t["curve"] == "circuit"].pivot(index="K", columns="gauge", values="ratio").to_numpy()
    np.testing.assert_allclose(circ, circ[:, :1].repeat(3, 1), rtol=1e-9)
    raw = t[t["curve"] == "raw"].pivot(index="K", columns="gauge", values="ratio").to_numpy()
    assert np.abs(raw / raw[:, :1] - 1).max() > 1e-3
    assert res.baseline_max_rel_change < 1e-9
    # stored values: mean + K components + K coefficients per head, in each space's own units
    d_raw, d_circ = model.cfg.d_head**2, res.config["feature_dims"]["circuit"]
    n = 8
    row = t[(t["curve"] == "raw") & (t["K"] == 2) & (t["gauge"] == 0)].iloc[0]
    assert row["stored_values"] == pca_parameter_count(2, d_raw, n) == d_raw * 3 + n * 2
    row = t[(t["curve"] == "circuit") & (t["K"] == 2) & (t["gauge"] == 0)].iloc[0]
    assert row["stored_values"] == pca_parameter_count(2, d_circ, n)
    assert 0 < row["residual_total"] < 1
    assert np.isnan(t[t["curve"] == "raw"]["residual_total"]).all()
    head = res.headline()
    assert head["raw"]["max_over_min"] > 1 and head["circuit_max_rel_dev"] < 1e-9
    text = res.paragraph()
    assert f"K={head['raw']['K']}" in text and "for every gauge" in text
    json.dumps(res.summary(), default=float)
    names = {tr.name for tr in res.figure.data}
    assert any("all gauges" in str(nm) for nm in names) and any("mean head" in str(nm) for nm in names)


def test_default_grid_and_validation(tokens: torch.Tensor) -> None:
    assert default_compare_ks(8) == list(range(9))
    assert default_compare_ks(40) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 16, 25, 40]
    model = make_model("mha")
    with pytest.raises(ValueError, match="gauges must be an integer"):
        compare_spaces(model, tokens, gauges=-1)
    with pytest.raises(ValueError, match=r"ks must lie in \[0, 8\]"):
        compare_spaces(model, tokens, ks=[9])


def _cli(out: Path, *extra: str) -> int:
    args = ["compare", "--out", str(out), "--ks", "2", "--gauges", "1", "--seeds", "1", "--n-tokens", "1024"]
    return main([*args, "--n-boot", "20", "--no-png", "--no-progress", *extra])


def test_compare_command_writes_json_figure_report_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(tmp_path / "a") == 0
    printed = capsys.readouterr().out
    assert "invariant curve: largest relative deviation over gauges" in printed and "raw curve" in printed
    js = tmp_path / "a" / "compare_stories260K.json"
    data = json.loads(js.read_text())
    assert list(data)[-1] == "timings" and set(data["points"]) == {
        "raw/g0", "raw/g1", "canonical/g0", "circuit/g0", "circuit/g1", "random/g0",
    }  # fmt: skip
    assert {"space", "K", "ratio", "stored_values", "gauge"} <= set(data["comparison"]["table"][0])
    assert (tmp_path / "a" / "compare_stories260K.html").is_file()
    report = (tmp_path / "a" / "compare_stories260K.md").read_text()
    assert data["comparison"]["paragraph"] in report and "| K |" in report
    # the same inputs: byte-identical apart from timings
    assert _cli(tmp_path / "b") == 0
    assert without_timings(js.read_text()) == without_timings((tmp_path / "b" / js.name).read_text())
    # resume reuses finished curves: drop the summary and one curve, resume, get the same file
    partial = json.loads(js.read_text())
    del partial["comparison"], partial["points"]["random/g0"]
    js.write_text(json.dumps(partial))
    assert _cli(tmp_path / "a", "--resume") == 0
    assert without_timings(js.read_text()) == without_timings((tmp_path / "b" / js.name).read_text())
    # another configuration is refused, the file left alone
    before = js.read_text()
    assert _cli(tmp_path / "a", "--resume", "--gauges", "2") == 2
    assert "different configuration" in capsys.readouterr().err and js.read_text() == before
    assert _cli(tmp_path / "a") == 2  # exists: neither --resume nor --overwrite


def test_compare_without_tokenizer_needs_repeated_tokens() -> None:
    model = make_model("mha")
    model.tokenizer = None
    cfg = qs.experiment.compare_config.CompareConfig()
    with pytest.raises(ValueError, match="--tokens repeated"):
        qs.experiment.compare_run.compare_tokens(model, cfg)
    toks, protocol = qs.experiment.compare_run.compare_tokens(
        model, cfg.replace(tokens="repeated", block=4, ctx=16)
    )
    assert toks.shape == (64, 16) and protocol["tokens"] == "repeated"
    torch.testing.assert_close(toks[:, :4], toks[:, 4:8])


INDUCTION = SHARED_DATA / "models" / "induction-2l"
needs_induction = pytest.mark.skipif(
    not INDUCTION.is_dir(), reason="needs ../shared/data/models/induction-2l"
)


@needs_induction
def test_induction_2l_invariant_curve_is_identical_under_gauges_raw_moves_tenfold() -> None:
    from qk_subspace.experiment.compare_config import CompareConfig
    from qk_subspace.experiment.compare_run import compare_tokens

    model = qs.load_model(INDUCTION)
    tokens, _ = compare_tokens(model, CompareConfig().replace(tokens="repeated"))
    res = compare_spaces(model, tokens, ks=[2, 4, 6], gauges=3, seeds=1, progress=False, n_boot=50)
    head = res.headline()
    assert head["circuit_max_rel_dev"] < 1e-6
    assert head["raw_largest"]["max_over_min"] > 10
    circ = res.table[(res.table["curve"] == "circuit") & (res.table["K"] == 4)]
    assert len(circ) == 4 and circ["ratio"].max() / circ["ratio"].min() - 1 < 1e-6


def test_stories260k_rotary_invariant_curve_under_commuting_gauges() -> None:
    # the embedded rotary, grouped-query model: random gauges are the rotary-commuting ones
    model = qs.load_model("stories260K")
    from qk_subspace.experiment.inputs import load_tokens

    tokens = load_tokens(model, n_tokens=2048)
    res = compare_spaces(model, tokens, ks=[3, 10], gauges=3, seeds=1, progress=False, n_boot=50)
    assert res.headline()["circuit_max_rel_dev"] < 1e-6
    assert res.baseline_max_rel_change < 1e-6
    assert res.headline()["raw_largest"]["max_over_min"] > 2
