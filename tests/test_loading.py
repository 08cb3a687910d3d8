from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import qk_subspace as qs
from tests.conftest import STORIES, TINYSTORIES, load_kwargs, requires_shared


def _save_tiny_gpt2(path: Path) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100
    )  # TL assumes d_mlp = 4 d_model
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(path)
    # TransformerLens' config conversion needs these two keys (a bare GPT2Config has neither).
    conf = json.loads((path / "config.json").read_text())
    conf["architectures"] = ["GPT2LMHeadModel"]
    conf["n_ctx"] = 64
    (path / "config.json").write_text(json.dumps(conf))
    return hf


def test_local_gpt2_checkpoint_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = _save_tiny_gpt2(tmp_path)
    model = qs.load_model(tmp_path, **load_kwargs())
    assert model.qk_subspace_processing["fold_ln"] is True
    toks = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(toks, labels=toks).loss.item()
    got = model(toks, return_type="loss").item()
    assert abs(got - ref) < 1e-4
    raw = qs.load_model(
        tmp_path, fold_ln=False, center_writing_weights=False, center_unembed=False, **load_kwargs()
    )
    assert raw.qk_subspace_processing["fold_ln"] is False
    assert abs(raw(toks, return_type="loss").item() - ref) < 1e-4


def test_local_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        qs.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration"):
        qs.load_model(tmp_path)
    with pytest.raises(TypeError, match="unknown processing"):
        qs.load_model(tmp_path, fold_layernorm=True)


def test_unknown_or_offline_name_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="local"):
        qs.load_model("definitely-not-a-model-xyz")
    with pytest.raises((ConnectionError, OSError), match=r"offline|local"):
        qs.load_model("gpt2-xl")
    assert time.perf_counter() - t0 < 10


@requires_shared
def test_stories260k_loads_offline_and_k_all_keeps_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = qs.load_model(STORIES)
    assert model.cfg.n_key_value_heads == 4 and model.cfg.n_heads == 8
    text = TINYSTORIES.read_text()[:6000]
    toks = model.tokenizer(text, return_tensors="pt").input_ids[:, :256]
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(toks, labels=toks).loss.item()
        base = model(toks, return_type="loss").item()
    assert abs(base - ref) < 1e-4
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)
    assert W.shape == (5, 8, 8, 8) and pca.n_nonzero_components_ == 39
    with torch.no_grad(), qs.inject_qk(model, pca.reconstruct(pca.n_heads_)) as edit:
        assert edit.max_abs_error.max() < 1e-4
        assert abs(model(toks, return_type="loss").item() - base) < 1e-6
