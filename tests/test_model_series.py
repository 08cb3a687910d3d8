"""Model series without Ray: --no-gate, the models file, the cross-model summary, checkpoints by step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main, models_from_file
from qk_subspace.model import loading
from qk_subspace.report.series import SERIES_FRACTIONS, series_summary
from tests.conftest import make_model, requires_hooked

KW: dict[str, Any] = dict(
    ks=(1, 2), cluster_ks=(4,), n_dims=3, n_boot=50, png=False, progress=False, gate_k=1
)


def test_no_gate_runs_every_model_and_writes_the_summary(tmp_path: Path) -> None:
    a, b = make_model("mha", seed=1), make_model("mha", seed=2)
    a.cfg.model_name, b.cfg.model_name = "first", "second"
    toks = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    gated, skipped = qs.run_models([a, b], tmp_path / "gated", tokens=toks, gate_threshold=1e-3, **KW)
    assert [r.name for r in gated] == ["first"] and [s[0] for s in skipped] == ["second"]
    done, skipped = qs.run_models(
        [a, b], tmp_path / "all", tokens=toks, gate_threshold=1e-3, gate=False, **KW
    )
    assert [r.name for r in done] == ["first", "second"] and skipped == []
    assert all(r.gate.passed is False for r in done)  # the gate is still measured and recorded
    summary = json.loads((tmp_path / "all" / "series_summary.json").read_text())
    assert summary == series_summary([r.results for r in done])
    assert (tmp_path / "all" / "series_summary.html").exists()
    gated_summary = json.loads((tmp_path / "gated" / "series_summary.json").read_text())["series"]
    assert (
        gated_summary["skipped"][0]["model"] == "second"
        and "gate failed" in gated_summary["skipped"][0]["reason"]
    )


def test_series_summary_reads_the_results() -> None:
    def doc(name: str, n: int, ratios: dict[int, float]) -> dict[str, Any]:
        return {
            "metadata": {"model": name, "model_source": name, "model_config": {"n_layers": 2}},
            "variance": {
                "n_heads": n,
                "thresholds": [{"threshold": 0.9, "K": 3, "fraction_of_heads": 3 / n}],
            },
            "baseline": {"ppl": 7.5},
            "perplexity_vs_k": [{"K": k, "ratio": r} for k, r in ratios.items()],
            "gate": {"passed": True},
            "status": {"complete": True},
        }

    rows = series_summary([doc("a", 8, {1: 9.0, 2: 5.0, 4: 2.0, 6: 1.5, 8: 1.0})])["series"]["models"]
    (row,) = rows
    assert row["k_90_variance"] == 3 and row["k_90_variance_fraction"] == 3 / 8 and row["baseline_ppl"] == 7.5
    at = {p["fraction"]: (p["K"], p["ratio"]) for p in row["ratio_at_fraction"]}
    assert list(at) == list(SERIES_FRACTIONS)
    # nearest evaluated K to 0.8, 2, 4, 6, 8 (ties go to the smaller K)
    assert at == {0.1: (1, 9.0), 0.25: (2, 5.0), 0.5: (4, 2.0), 0.75: (6, 1.5), 1.0: (8, 1.0)}


def test_models_file(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    f = tmp_path / "models.txt"
    f.write_text("# a series\ngpt2\n\n  ckpt   # relative to the file\npythia-70m@1000\n")
    assert models_from_file(str(f)) == ["gpt2", str(tmp_path / "ckpt"), "pythia-70m@1000"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert main(["run", "--models-file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    assert main(["run", "--models-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_checkpoint_names() -> None:
    assert loading.split_checkpoint("pythia-70m@1000") == ("pythia-70m", 1000)
    assert loading.split_checkpoint("EleutherAI/pythia-160m@143000") == ("EleutherAI/pythia-160m", 143000)
    assert loading.split_checkpoint("gpt2") == ("gpt2", None)
    assert loading.split_checkpoint("user@host") == ("user@host", None)


@requires_hooked
def test_a_checkpoint_by_step_is_loaded_with_checkpoint_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from qk_subspace.model.backends import hooked

    seen: dict[str, Any] = {}
    tiny = make_model("mha", seed=0)

    def fake(name: str, *args: Any, **kw: Any) -> Any:
        seen.update(name=name, **kw)
        return tiny

    monkeypatch.setattr(hooked, "from_official", fake)
    monkeypatch.setattr(loading, "_hub_cached", lambda repo: True)
    model = qs.load_model("pythia-70m@1000", backend="hooked")
    assert seen["name"] == "pythia-70m" and seen["checkpoint_value"] == 1000
    assert model.qk_subspace_source == "EleutherAI/pythia-70m@1000"
    assert model.qk_subspace_load_arguments["name_or_path"] == "pythia-70m@1000"  # what workers repeat
    with pytest.raises(ValueError, match="backend='hooked'"):
        qs.load_model("pythia-70m@1000", backend="bridge")
