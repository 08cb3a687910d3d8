"""The front door: ``qk-subspace run`` on the embedded model, and refusals that name the flag and write nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main
from qk_subspace.model.embedded import EMBEDDED_NAME, EVAL_SEQUENCES, SEQ_LEN, embedded_tokens
from tests.tiny_checkpoint import save_tiny_gpt2, write_text

QUICK = ["--no-progress", "--no-png", "--n-tokens", "2048", "--ks", "0", "40", "--cluster-ks", "4"]


def test_default_run_is_the_whole_experiment_on_the_embedded_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network needed
    assert main(["run", "--no-progress"]) == 0
    out = tmp_path / "results"
    data = json.loads((out / f"exp6_{EMBEDDED_NAME}.json").read_text())
    assert data["status"]["complete"] and data["checks"]["k_all"]["ok"]
    proto = data["metadata"]["protocol"]
    assert proto["route"] == "embedded" and (proto["n_chunks"], proto["ctx"]) == (EVAL_SEQUENCES, SEQ_LEN)
    assert "embedded" in data["metadata"]["model_source"]
    figures = sorted(out.glob("*.html"))
    assert len(figures) >= 4 and (out / "plotly.min.js").is_file()
    report = (out / "report.md").read_text()
    assert "text the model generated itself" in report
    for line in report.splitlines():  # only files that exist are listed or embedded
        if line.startswith(("![", "- `exp6")):
            for name in [p.strip("`(),") for p in line.replace("(", " ").split() if "." in p and "exp6" in p]:
                assert (out / name.split(")")[0]).is_file(), name
    printed = capsys.readouterr().out
    assert "written:" in printed and str(Path("results") / "report.md") in printed


def test_embedded_tokens_are_the_models_own_samples() -> None:
    evaluation, side = embedded_tokens()
    assert evaluation.shape == side.shape == (EVAL_SEQUENCES * SEQ_LEN,)
    model = qs.load_model(EMBEDDED_NAME)
    bos = model.tokenizer.bos_token_id
    seqs = evaluation.reshape(EVAL_SEQUENCES, SEQ_LEN)
    assert (seqs[:, 0] == bos).all() and int(evaluation.max()) < model.cfg.d_vocab
    # text the model wrote itself is text it predicts well (TinyStories itself: about 1.4 nats/token)
    nll = qs.perplexity(model, seqs[:8], progress=False).mean_nll
    assert nll < 1.5


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--ks", "100000"], "--ks"),
        (["--ctx", "100000"], "--ctx"),
        (["--model", "does/not/exist"], "--model"),
        (["--n-dims", "0"], "--n-dims"),
        (["--space", "circuit", "--diagnostics"], "--diagnostics"),
    ],
)
def test_refusals_name_the_flag_exit_2_and_write_nothing(
    args: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", *args, "--out", str(out), *QUICK[:2]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qk-subspace: error:") and flag in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without CUDA")
def test_cuda_on_a_cpu_torch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "cpu" in err and not (tmp_path / "o").exists()


def test_offline_local_model_without_text_names_text_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = write_text(tmp_path / "t.txt", n_words=500)
    model_dir = save_tiny_gpt2(tmp_path / "tiny", text.read_text())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert main(["run", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert time.perf_counter() - t0 < 20  # no retry loop against an unreachable hub (it took ~30 s)
    err = capsys.readouterr().err
    assert "--text-file" in err and "no network" in err and not (tmp_path / "o").exists()


def test_few_chunks_warn_that_the_intervals_mean_nothing(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="only 2 evaluation chunk"):
        main(
            [
                "run",
                "--out",
                str(tmp_path),
                *QUICK[:2],
                "--n-tokens",
                "512",
                "--ks",
                "40",
                "--cluster-ks",
                "4",
            ]
        )


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert qs.__version__ in capsys.readouterr().out
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap anywhere
    assert "--text-file" in text and f"default: {EMBEDDED_NAME}" in text
