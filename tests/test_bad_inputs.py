"""Catalogue of bad inputs: each must raise the right exception type with a message that names the
parameter, the offending value and what is allowed, and must not have written anything.

Every case runs against a tiny model whose parameters are hashed (sha256) before and after. Cases
that need the CLI / experiment runner (unwritable output dir, --resume on another configuration,
cluster k, n_dims) are tested with those modules.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import qk_subspace as qs
from tests.conftest import make_model
from tests.test_integrity import param_hashes, single_thread  # noqa: F401 - autouse fixture


class CharTokenizer:
    """A minimal tokenizer with the Hugging Face call signature used by qk_subspace.data."""

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict:
        return {"input_ids": [ord(c) % 50 for c in text]}


@dataclass
class Ctx:
    model: torch.nn.Module  # mha: 2 layers x 4 heads, d_head 8, n_ctx 32, d_vocab 50
    pca: qs.HeadPCA  # fitted on the model's 8 heads
    tokens: torch.Tensor  # [4, 16]
    tmp: Path


Case = Callable[[Ctx], tuple[type[BaseException], Callable[[], object], list[str]]]


def _target(ctx: Ctx) -> torch.Tensor:
    return qs.qk_matrices(ctx.model)


def _with_inf(ctx: Ctx) -> torch.Tensor:
    t = _target(ctx)
    t[1, 2, 0, 3] = float("inf")
    return t


def _with_nan(ctx: Ctx) -> torch.Tensor:
    t = _target(ctx)
    t[0, 1, 2, 2] = float("nan")
    return t


def _enter(edit_factory: Callable[[], qs.ParameterEdit]) -> Callable[[], None]:
    def run() -> None:
        with edit_factory():
            pytest.fail("the block must not run")

    return run


def _make_singular(ctx: Ctx) -> None:
    with torch.no_grad():  # test setup, not library code: make W_K^T W_K singular for L1H2
        ctx.model.blocks[1].attn.W_K[2, :, 0] = 0.0


def _singular_case(ctx: Ctx):
    _make_singular(ctx)
    return (
        ValueError,
        _enter(lambda: qs.inject_qk(ctx.model, _target(ctx))),
        ["L1H2", "singular", "< 1e+14", "heads="],
    )


def _sweep_bad_k(ctx: Ctx):
    forward_calls = []
    ctx.model.add_hook("hook_embed", lambda act, hook: forward_calls.append(1))

    def run() -> None:
        try:
            qs.sweep_k(ctx.model, ctx.pca, ctx.tokens, [1, 99], progress=False)
        finally:
            ctx.model.reset_hooks()
            assert forward_calls == [], "sweep_k evaluated before validating all K"

    return ValueError, run, ["K", "99", "[0, 8]"]


def _local_dir(ctx: Ctx, config: str | None) -> Path:
    d = ctx.tmp / "ckpt"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    return d


CASES: dict[str, Case] = {
    # --- K (HeadPCA.reconstruct, sweep_k)
    "K<0": lambda c: (ValueError, lambda: c.pca.reconstruct(K=-1), ["K", "-1", "[0, 8]"]),
    "K>n_heads": lambda c: (ValueError, lambda: c.pca.reconstruct(K=9), ["K", "9", "[0, 8]"]),
    "K float": lambda c: (TypeError, lambda: c.pca.reconstruct(K=2.5), ["K", "2.5", "integer", "[0, 8]"]),
    "K str": lambda c: (TypeError, lambda: c.pca.reconstruct(K="3"), ["K", "'3'", "integer"]),
    "K bool": lambda c: (TypeError, lambda: c.pca.reconstruct(K=True), ["K", "True", "integer"]),
    "sweep_k K out of range (validated before any evaluation)": _sweep_bad_k,
    "sweep_k non-integer K": lambda c: (
        TypeError,
        lambda: qs.sweep_k(c.model, c.pca, c.tokens, [2, 3.5], progress=False),
        ["K", "3.5", "integer"],
    ),
    "sweep_k empty ks": lambda c: (
        ValueError,
        lambda: qs.sweep_k(c.model, c.pca, c.tokens, [], progress=False),
        ["ks", "[]", "at least one"],
    ),
    "K and components both": lambda c: (
        ValueError,
        lambda: c.pca.reconstruct(K=2, components=[0]),
        ["K", "components", "exactly one"],
    ),
    "components out of range": lambda c: (
        ValueError,
        lambda: c.pca.reconstruct(components=[0, 8]),
        ["components", "8", "[0, 7]"],
    ),
    "components repeated": lambda c: (
        ValueError,
        lambda: c.pca.reconstruct(components=[1, 1]),
        ["components", "[1, 1]", "distinct"],
    ),
    "components not integers": lambda c: (
        TypeError,
        lambda: c.pca.reconstruct(components=[0, 1.5]),
        ["components", "1.5", "integers", "[0, 7]"],
    ),
    "sweep_k with a pca fitted on another model": lambda c: (
        ValueError,
        lambda: qs.sweep_k(c.model, qs.HeadPCA().fit(torch.randn(3, 2, 8, 8)), c.tokens, [1], progress=False),
        ["pca", "(3, 2)", "(2, 4)"],
    ),
    # --- HeadPCA inputs
    "HeadPCA W not [..., d, d]": lambda c: (
        ValueError,
        lambda: qs.HeadPCA().fit(torch.zeros(3, 4)),
        ["W", "(3, 4)", "[..., d, d]"],
    ),
    "HeadPCA W with NaN": lambda c: (
        ValueError,
        lambda: qs.HeadPCA().fit(_with_nan(c)),
        ["W", "NaN", "finite"],
    ),
    "HeadPCA one head": lambda c: (
        ValueError,
        lambda: qs.HeadPCA().fit(torch.zeros(1, 1, 3, 3)),
        ["W", "1", "at least 2"],
    ),
    "HeadPCA n_components=0": lambda c: (
        ValueError,
        lambda: qs.HeadPCA(n_components=0).fit(_target(c)),
        ["n_components", "0", "[1, 8]"],
    ),
    "HeadPCA transform wrong d": lambda c: (
        ValueError,
        lambda: c.pca.transform(torch.zeros(2, 6, 6)),
        ["W", "(6, 6)", "(8, 8)"],
    ),
    "threshold > 1": lambda c: (
        ValueError,
        lambda: c.pca.n_components_for(1.5),
        ["threshold", "1.5", "(0, 1]"],
    ),
    "unfitted HeadPCA": lambda c: (RuntimeError, lambda: qs.HeadPCA().reconstruct(K=1), ["HeadPCA", "fit"]),
    # --- W_QK target (inject_qk)
    "target wrong shape": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, torch.zeros(2, 4, 8))),
        ["target", "(2, 4, 8)", "(2, 4, 8, 8)"],
    ),
    "target integer dtype": lambda c: (
        TypeError,
        _enter(lambda: qs.inject_qk(c.model, torch.zeros(2, 4, 8, 8, dtype=torch.long))),
        ["target", "torch.int64", "floating-point"],
    ),
    "target complex dtype": lambda c: (
        TypeError,
        _enter(lambda: qs.inject_qk(c.model, torch.zeros(2, 4, 8, 8, dtype=torch.complex64))),
        ["target", "torch.complex64", "floating-point"],
    ),
    "target wrong device (meta)": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, torch.zeros(2, 4, 8, 8, device="meta"))),
        ["target", "meta", "cpu"],
    ),
    "target not a tensor": lambda c: (
        TypeError,
        _enter(lambda: qs.inject_qk(c.model, np.zeros((2, 4, 8, 8)))),
        ["target", "ndarray", "torch.Tensor"],
    ),
    "target with Inf": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _with_inf(c))),
        ["target", "Inf", "L1H2", "finite"],
    ),
    "target with NaN": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _with_nan(c))),
        ["target", "NaN", "L0H1", "finite"],
    ),
    "target overflowing float32 weights": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c) * 1e300)),
        ["target", "L0H0", "overflow", "float32"],
    ),
    "method unknown": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c), method="lstsq")),
        ["method", "'lstsq'", "'exact'"],
    ),
    "singular W_K^T W_K": _singular_case,
    # --- heads
    "heads flat index out of range": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c), heads=[3, 8])),
        ["heads", "8", "0..7"],
    ),
    "heads negative flat index": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c), heads=[-1])),
        ["heads", "-1", "0..7"],
    ),
    "heads (layer, head) out of range": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c), heads=[(2, 0)])),
        ["heads", "(2, 0)", "0..1"],
    ),
    "heads mask wrong shape": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c), heads=torch.ones(3, 4, dtype=torch.bool))),
        ["heads", "(3, 4)", "(2, 4)"],
    ),
    "heads non-integer index": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c), heads=[1.5])),
        ["heads", "1.5", "0..7"],
    ),
    "heads (layer, head) not integers": lambda c: (
        ValueError,
        _enter(lambda: qs.inject_qk(c.model, _target(c), heads=[(1.5, 0)])),
        ["heads", "(1.5, 0)", "0..3"],
    ),
    # --- ParameterEdit plans
    "plan names a missing parameter": lambda c: (
        KeyError,
        _enter(lambda: qs.ParameterEdit(c.model, {"blocks.9.attn.W_Q": torch.zeros(1)})),
        ["blocks.9.attn.W_Q", "named_parameters"],
    ),
    "plan value of wrong shape after a good one": lambda c: (
        ValueError,
        _enter(
            lambda: qs.ParameterEdit(
                c.model,
                {"blocks.0.attn.W_Q": torch.zeros(4, 32, 8), "blocks.1.attn.W_Q": torch.zeros(4, 8, 32)},
            )
        ),
        ["blocks.1.attn.W_Q", "(4, 8, 32)", "(4, 32, 8)"],
    ),
    # --- tokens (perplexity)
    "tokens rank 1": lambda c: (
        ValueError,
        lambda: qs.perplexity(c.model, c.tokens[0], progress=False),
        ["tokens", "(16,)", "rank 2"],
    ),
    "tokens float dtype": lambda c: (
        TypeError,
        lambda: qs.perplexity(c.model, c.tokens.float(), progress=False),
        ["tokens", "torch.float32", "integer"],
    ),
    "tokens id >= d_vocab": lambda c: (
        ValueError,
        lambda: qs.perplexity(c.model, torch.full((2, 8), 50), progress=False),
        ["tokens", "max 50", "[0, 49]"],
    ),
    "tokens negative id": lambda c: (
        ValueError,
        lambda: qs.perplexity(c.model, torch.full((2, 8), -1), progress=False),
        ["tokens", "min -1", "[0, 49]"],
    ),
    "tokens longer than n_ctx": lambda c: (
        ValueError,
        lambda: qs.perplexity(c.model, torch.zeros(2, 40, dtype=torch.long), progress=False),
        ["tokens", "ctx=40", "n_ctx=32"],
    ),
    "tokens empty": lambda c: (
        ValueError,
        lambda: qs.perplexity(c.model, torch.zeros(0, 16, dtype=torch.long), progress=False),
        ["tokens", "(0, 16)", "at least 1 chunk"],
    ),
    "batch_size 0": lambda c: (
        ValueError,
        lambda: qs.perplexity(c.model, c.tokens, batch_size=0, progress=False),
        ["batch_size", "0", "positive"],
    ),
    "paired_ratio confidence": lambda c: (
        ValueError,
        lambda: qs.paired_ratio(*[qs.perplexity(c.model, c.tokens, progress=False)] * 2, confidence=1.5),
        ["confidence", "1.5", "(0, 1)"],
    ),
    # --- text and chunking
    "empty text": lambda c: (
        ValueError,
        lambda: qs.chunk_text(CharTokenizer(), "", ctx=8),
        ["text", "''", "non-empty"],
    ),
    "whitespace-only text": lambda c: (
        ValueError,
        lambda: qs.chunk_text(CharTokenizer(), " \n\n ", ctx=8),
        ["text", "non-empty"],
    ),
    "text shorter than one chunk": lambda c: (
        ValueError,
        lambda: qs.chunk_text(CharTokenizer(), "hello", ctx=8),
        ["text", "5 tokens", "ctx=8"],
    ),
    "n_tokens < ctx": lambda c: (
        ValueError,
        lambda: qs.chunk_text(CharTokenizer(), "x" * 100, n_tokens=4, ctx=8),
        ["n_tokens", "4", "ctx=8"],
    ),
    "ctx < 2": lambda c: (
        ValueError,
        lambda: qs.evaluation.tokens.chunk_tokens(list(range(10)), None, ctx=1),
        ["ctx", "1", ">= 2"],
    ),
    "no tokenizer": lambda c: (
        ValueError,
        lambda: qs.chunk_text(None, "some text", ctx=2),
        ["tokenizer", "None"],
    ),
    "missing text file": lambda c: (
        FileNotFoundError,
        lambda: qs.load_wikitext2(CharTokenizer(), text_file=c.tmp / "nope.raw"),
        ["text_file", "nope.raw", "existing"],
    ),
    # --- loading
    "local dir without config.json": lambda c: (
        FileNotFoundError,
        lambda: qs.load_model(_local_dir(c, None)),
        ["ckpt", "config.json"],
    ),
    "local dir with unsupported architecture": lambda c: (
        ValueError,
        lambda: qs.load_model(_local_dir(c, json.dumps({"architectures": ["T5ForConditionalGeneration"]}))),
        ["ckpt", "T5ForConditionalGeneration", "GPT2LMHeadModel"],
    ),
    "local dir with broken config.json": lambda c: (
        ValueError,
        lambda: qs.load_model(_local_dir(c, "{not json")),
        ["config.json", "ckpt", "JSON"],
    ),
    "nonexistent model path": lambda c: (
        FileNotFoundError,
        lambda: qs.load_model(c.tmp / "models" / "mine.safetensors"),
        ["mine.safetensors", "local"],
    ),
    "official name that unpickles, without opt-in": lambda c: (
        ValueError,
        lambda: qs.load_model("solu-1l"),
        ["solu-1l", "trust_remote_code=True", "False"],
    ),
    "dtype given as a string": lambda c: (
        TypeError,
        lambda: qs.load_model(_local_dir(c, "{}"), dtype="float32"),
        ["dtype", "'float32'", "torch.float32"],
    ),
    "unknown processing option": lambda c: (
        TypeError,
        lambda: qs.load_model("gpt2", fold_layernorm=True),
        ["fold_layernorm", "fold_ln"],
    ),
}


@pytest.fixture
def ctx(tmp_path: Path) -> Ctx:
    model = make_model("mha")
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    return Ctx(model, pca, tokens, tmp_path)


def test_catalogue_has_at_least_20_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, ctx: Ctx) -> None:
    exc_type, run, fragments = CASES[case](ctx)
    before = param_hashes(ctx.model)
    version = qs.edits.parameter_edit.weights_version(ctx.model)
    with pytest.raises(exc_type) as info:
        run()
    msg = str(info.value)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"{case}: message {msg!r} lacks {missing}"
    assert param_hashes(ctx.model) == before, f"{case}: parameters changed"
    assert qs.edits.parameter_edit.weights_version(ctx.model) == version and qs.active_edits(ctx.model) == []


@pytest.mark.parametrize("name", ["definitely-not-a-model-xyz", "gpt2-xl"])
def test_unknown_or_uncached_model_name_offline_is_fast_and_says_how_to_load_locally(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises((ValueError, ConnectionError)) as info:
        qs.load_model(name)
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert name in msg and "local Hugging Face checkpoint directory" in msg and "'stories260K'" in msg
    assert "qs." not in msg  # advice in words, not in Python syntax (the CLI user reads it too)


# ------------------------------------------------------------------ output directory of the runner
def test_unwritable_output_dir_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    """An output directory that cannot be created or written: PermissionError naming out_dir and the
    value, raised before the model is loaded or anything is written."""
    from qk_subspace.experiment import context, runner

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    loaded = []
    monkeypatch.setattr(context, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(PermissionError, match=r"out_dir '.*a_file/out'.*writable directory"):
        qs.run_experiment(str(tmp_path / "no_model"), blocker / "out")
    ro = tmp_path / "read_only"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(runner.os, "access", lambda p, m: False if str(p) == str(ro) else real_access(p, m))
    with pytest.raises(PermissionError, match=r"out_dir '.*read_only' is not writable"):
        qs.run_experiment(str(tmp_path / "no_model"), ro)
    assert list(ro.iterdir()) == [] and loaded == []
