"""The fast evaluation forward (qk_subspace.fastpath) against TransformerLens' standard forward."""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.edits.parameter_edit import ParameterEdit
from qk_subspace.model import backends, fastforward, fastpath
from tests.conftest import (
    HOOKED,
    assert_params_equal,
    make_model,
    param_snapshot,
    requires_hooked,
)


def _cfg_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Any:
    """A tiny random HookedTransformer from config overrides (biases randomised like conftest.make_model)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "d_head": 8,
        "d_mlp": 64,
        "n_ctx": 32,
        "d_vocab": 50,
        "seed": seed,
        "dtype": dtype,
        "device": "cpu",
        "act_fn": "gelu_new",
        "normalization_type": "LN",
    }
    base.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**base))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in ("b_Q", "b_K", "b_V", "b_O", "_b_K", "_b_V", "b_in", "b_out", "b_U"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if leaf in ("w",):  # non-trivial norm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


#: GPT-2, Pythia/NeoX, GPT-J, Llama-style and folded-norm configurations.
CONFIGS = {
    "gpt2": {},
    "gpt2_lnpre": {"normalization_type": "LNPre"},
    "neox_partial_rotary_parallel": {
        "positional_embedding_type": "rotary",
        "rotary_dim": 4,
        "parallel_attn_mlp": True,
        "act_fn": "gelu",
    },
    "gptj_adjacent_rotary": {
        "positional_embedding_type": "rotary",
        "rotary_dim": 4,
        "rotary_adjacent_pairs": True,
        "parallel_attn_mlp": True,
    },
    "llama_gqa": {
        "positional_embedding_type": "rotary",
        "rotary_dim": 8,
        "normalization_type": "RMS",
        "act_fn": "silu",
        "gated_mlp": True,
        "n_key_value_heads": 2,
    },
    "llama_rmspre_mqa": {
        "positional_embedding_type": "rotary",
        "rotary_dim": 8,
        "normalization_type": "RMSPre",
        "act_fn": "silu",
        "gated_mlp": True,
        "n_key_value_heads": 1,
    },
    "attn_only_relu_scaled": {"attn_only": True, "act_fn": "relu", "scale_attn_by_inverse_layer_idx": True},
    # no normalisation: the MLP of a parallel block must read the block's input, not the updated stream
    "parallel_no_norm": {"normalization_type": None, "parallel_attn_mlp": True},
    "sequential_no_norm": {"normalization_type": None},
}


def _standard_token_nll(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(tokens, return_type="logits")
        return -torch.log_softmax(logits[:, :-1].to(torch.float64), -1).gather(-1, tokens[:, 1:, None])[
            ..., 0
        ]


def _tokens(n: int = 5, ctx: int = 32, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


@requires_hooked
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_matches_standard_float64_and_float32(name: str) -> None:
    toks = _tokens()
    # float64: the two forwards agree to round-off, so any semantic difference would show
    m64 = _cfg_model(torch.float64, **CONFIGS[name])
    assert fastpath.unsupported_reason(m64) is None
    ref = _standard_token_nll(m64, toks)
    with torch.inference_mode():
        got = fastpath.fast_token_nll(m64, toks)
    assert got is not None
    assert torch.allclose(got.double(), ref, rtol=0, atol=1e-6), (got.double() - ref).abs().max()
    # float32: the loss within 1e-5 relative (the criterion), per token within 1e-4
    m32 = _cfg_model(torch.float32, **CONFIGS[name])
    ref32 = _standard_token_nll(m32, toks)
    fast = qs.perplexity(m32, toks, batch_size=2, progress=False, fast=True)
    std = qs.perplexity(m32, toks, batch_size=2, progress=False, fast=False)
    assert fast.path == "fast" and std.path == "standard"
    assert abs(fast.mean_nll - std.mean_nll) / std.mean_nll < 1e-5
    assert abs(std.mean_nll - float(ref32.mean())) / std.mean_nll < 1e-6
    np.testing.assert_allclose(fast.nll_per_chunk, std.nll_per_chunk, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_perplexity_fast_equals_standard_on_conftest_models(kind: str, tokens: torch.Tensor) -> None:
    model = make_model(kind)
    fast = qs.perplexity(model, tokens, batch_size=3, progress=False)  # default: fast path on
    std = qs.perplexity(model, tokens, batch_size=3, progress=False, fast=False)
    assert fast.path == "fast" and std.path == "standard"
    assert abs(fast.mean_nll - std.mean_nll) / std.mean_nll < 1e-5
    assert fast.n_tokens == std.n_tokens


def test_pattern_hook_forces_standard_path_and_is_honoured(tokens: torch.Tensor) -> None:
    model = make_model("mha")
    base = qs.perplexity(model, tokens, progress=False)
    calls: list[tuple[int, ...]] = []

    def uniform_pattern(pattern: torch.Tensor, hook) -> torch.Tensor:
        calls.append(tuple(pattern.shape))
        causal = torch.tril(torch.ones_like(pattern))
        return causal / causal.sum(-1, keepdim=True)

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", uniform_pattern)]):
        assert "hooks attached" in (fastpath.unsupported_reason(model) or "")
        hooked = qs.perplexity(model, tokens, progress=False, fast=True)
        with torch.inference_mode():
            expected = model(tokens, return_type="loss", loss_per_token=True).double().mean(1).numpy()
    assert hooked.path == "standard"
    assert calls and calls[0][-2:] == (tokens.shape[1], tokens.shape[1])
    np.testing.assert_allclose(hooked.nll_per_chunk, expected, rtol=1e-6)
    assert abs(hooked.mean_nll - base.mean_nll) > 1e-3  # the hook changed the model and was seen
    after = qs.perplexity(model, tokens, progress=False)  # hook removed: fast again, same as before
    assert after.path == "fast" and after.mean_nll == pytest.approx(base.mean_nll, rel=1e-12)


def test_any_hook_point_forces_fallback(tokens: torch.Tensor) -> None:
    model = make_model("gqa")
    for hook_name in ("blocks.1.attn.hook_attn_scores", "blocks.0.hook_resid_post", "hook_embed"):
        model.add_hook(hook_name, lambda x, hook: x)
        assert fastpath.unsupported_reason(model) is not None
        assert qs.perplexity(model, tokens, progress=False).path == "standard"
        model.reset_hooks()
    assert fastpath.unsupported_reason(model) is None


def test_inject_qk_is_seen_by_the_fast_path(tokens: torch.Tensor) -> None:
    model = make_model("gqa")
    snap = param_snapshot(model)
    base = qs.perplexity(model, tokens, progress=False)
    assert qs.perplexity(model, tokens, progress=False).mean_nll == base.mean_nll
    W = qs.qk_matrices(model)
    target = W + 0.5 * torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=W.dtype)
    with qs.inject_qk(model, target):
        edited_fast = qs.perplexity(model, tokens, progress=False)
        edited_std = qs.perplexity(model, tokens, progress=False, fast=False)
    assert edited_fast.path == "fast"
    assert abs(edited_fast.mean_nll - base.mean_nll) > 1e-4
    assert edited_fast.mean_nll == pytest.approx(edited_std.mean_nll, rel=1e-5)
    assert_params_equal(model, snap)
    restored = qs.perplexity(model, tokens, progress=False)
    assert restored.mean_nll == pytest.approx(base.mean_nll, rel=1e-12)


def test_fast_path_keeps_no_weight_copies() -> None:
    """Every weight the fast forward reads is a view of a parameter's own storage (a bias the model does
    not have is zeros; a bridge's rotary tables are computed from the model's own rotary embedding)."""
    for kind in ("mha", "gqa"):
        model = make_model(kind)
        W = fastpath.gather(model, 16)
        storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        tensors = [W.W_E, W.W_U] + ([W.b_U] if W.b_U is not None else [])
        for L in W.layers:
            tensors += [
                t for k, t in vars(L).items() if isinstance(t, torch.Tensor) and not k.startswith("rot_")
            ]
        views = [t.untyped_storage().data_ptr() in storages for t in tensors]
        assert sum(views) >= 10 * len(W.layers)
        assert all(v or not t.any() for v, t in zip(views, tensors, strict=True))


def _state_dict_key(model: Any, p: torch.nn.Parameter) -> str:
    return next(
        k for k, v in model.state_dict().items() if v.data_ptr() == p.data_ptr() and v.shape == p.shape
    )


def _parameter_of(model: Any, weight: str) -> tuple[str, torch.nn.Parameter]:
    """``(name, parameter)`` that stores a TransformerLens-named weight (on a bridge, the Hugging Face one)."""
    if backends.name_of(model) == "hooked":
        return weight, dict(model.named_parameters())[weight]
    if weight.endswith("mlp.W_in"):
        p = getattr(model.blocks[int(weight.split(".")[1])].mlp, "in").original_component.weight
    else:
        p = qs.model.weights.weight_slots(model)[weight].parameter
    return next((n, q) for n, q in model.named_parameters() if q is p)


@pytest.mark.parametrize(
    "write",
    ["edit", "load_state_dict", "data_setitem", "data_inplace", "data_assign"],
)
def test_every_route_of_writing_weights_is_seen(write: str, tokens: torch.Tensor) -> None:
    """Edits by qk_subspace, load_state_dict, and writes through ``p.data`` (which bypass torch's
    in-place version counter) all change the fast path's result exactly as the standard forward's."""
    for weight in ("blocks.1.attn.W_K", "blocks.0.attn.W_V", "blocks.1.attn.W_Q", "blocks.0.mlp.W_in"):
        model = make_model("mha")
        base = qs.perplexity(model, tokens, progress=False).mean_nll
        name, p = _parameter_of(model, weight)
        new = 2.0 * p.detach().clone()
        with contextlib.ExitStack() as stack:
            if write == "edit":
                stack.enter_context(ParameterEdit(model, {name: new}))
            elif write == "load_state_dict":
                sd = {k: v.clone() for k, v in model.state_dict().items()}
                key = name if name in sd else _state_dict_key(model, p)  # a bridge names its own keys
                sd[key] = new
                model.load_state_dict(sd)
            elif write == "data_setitem":
                p.data[...] = new
            elif write == "data_inplace":
                p.data.mul_(2.0)
            else:
                p.data = new.clone()
            fast = qs.perplexity(model, tokens, progress=False)
            std = qs.perplexity(model, tokens, progress=False, fast=False).mean_nll
        assert fast.path == "fast"
        assert fast.mean_nll == pytest.approx(std, rel=1e-5) and abs(fast.mean_nll - base) > 1e-4, (
            write,
            name,
        )
        if write == "edit":  # the edit's restore is seen too
            assert qs.perplexity(model, tokens, progress=False).mean_nll == pytest.approx(base, rel=1e-12)


def test_switches_env_global_and_argument(tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("mha")
    monkeypatch.setenv(fastpath.FAST_ENV, "0")
    assert not fastpath.fast_path_enabled()
    assert qs.perplexity(model, tokens, progress=False).path == "standard"
    assert qs.perplexity(model, tokens, progress=False, fast=True).path == "fast"
    monkeypatch.setenv(fastpath.FAST_ENV, "1")
    try:
        fastpath.set_fast_path_enabled(False)
        assert qs.perplexity(model, tokens, progress=False).path == "standard"
        fastpath.set_fast_path_enabled(True)
        assert qs.perplexity(model, tokens, progress=False).path == "fast"
        assert qs.perplexity(model, tokens, progress=False, fast=False).path == "standard"
    finally:
        fastpath.set_fast_path_enabled(None)
    with pytest.raises(TypeError, match="enabled"):
        fastpath.set_fast_path_enabled("yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"attn_scores_soft_cap": 30.0}, "soft-capping"),
        ({"output_logits_soft_cap": 30.0}, "soft-capping"),
        ({"use_local_attn": True, "window_size": 4, "attn_types": ["global", "local"]}, "local"),
        ({"positional_embedding_type": "alibi"}, "positional_embedding_type"),
        ({"positional_embedding_type": "shortformer"}, "positional_embedding_type"),
        ({"use_attn_result": True}, "use_attn_result"),
        ({"act_fn": "solu_ln"}, "layer-norm activation"),
    ],
)
@requires_hooked
def test_unsupported_configurations_fall_back(overrides: dict, reason: str) -> None:
    model = _cfg_model(**overrides)
    why = fastpath.unsupported_reason(model)
    assert why is not None and reason in why
    toks = _tokens(3)
    res = qs.perplexity(model, toks, progress=False, fast=True)
    assert res.path == "standard"
    np.testing.assert_allclose(res.nll_per_chunk, _standard_token_nll(model, toks).mean(1).numpy(), rtol=1e-6)


def test_left_padding_tokenizer_mask_falls_back_per_batch() -> None:
    model = make_model("gqa")
    # TransformerLens builds a padding mask for left-padding tokenizers; leading pad ids are masked.
    if HOOKED:
        model.tokenizer = types.SimpleNamespace(padding_side="left", pad_token_id=0, bos_token_id=1)
    else:  # a bridge keeps a real tokenizer: the embedded model's pads on the left with id 2
        assert model.tokenizer.padding_side == "left"
    pad = int(model.tokenizer.pad_token_id)
    toks = _tokens(4, 16, seed=5).clamp(min=pad + 1)
    toks[2, :3] = pad  # leading pads in chunk 2 only
    res = qs.perplexity(model, toks, batch_size=2, progress=False, fast=True)
    assert res.path == "mixed"  # chunks 0-1 fast, chunks 2-3 standard
    std = qs.perplexity(model, toks, batch_size=2, progress=False, fast=False)
    np.testing.assert_allclose(res.nll_per_chunk, std.nll_per_chunk, rtol=1e-5)


@requires_hooked
def test_bfloat16_close_to_standard() -> None:
    model = _cfg_model(torch.bfloat16, **CONFIGS["llama_gqa"])
    toks = _tokens(3)
    fast = qs.perplexity(model, toks, progress=False, fast=True)
    std = qs.perplexity(model, toks, progress=False, fast=False)
    assert fast.path == "fast"
    assert abs(fast.mean_nll - std.mean_nll) / std.mean_nll < 2e-2


def test_flops_per_token_gpt2_small() -> None:
    shape = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257)
    cfg = types.SimpleNamespace(
        **shape, d_vocab_out=50257, n_key_value_heads=None, attn_only=False, gated_mlp=False
    )
    d, L, V, T = 768, 12, 50257, 1024
    expected = L * (2 * 4 * d * d + 2 * 2 * d * 4 * d + 4 * d * (T + 1) / 2) + 2 * d * V
    assert fastpath.flops_per_token(cfg, T) == pytest.approx(expected)


def test_real_stories260k_fast_equals_standard(stories260k: tuple[Path, Path]) -> None:
    STORIES, TINYSTORIES = stories260k
    model = qs.load_model(str(STORIES))
    assert fastpath.unsupported_reason(model) is None, fastpath.unsupported_reason(model)
    text = TINYSTORIES.read_text()[:20000]
    toks = qs.chunk_text(model.tokenizer, text, ctx=128)[:6]
    fast = qs.perplexity(model, toks, batch_size=3, progress=False, fast=True)
    std = qs.perplexity(model, toks, batch_size=3, progress=False, fast=False)
    assert fast.path == "fast"
    assert abs(fast.mean_nll - std.mean_nll) / std.mean_nll < 1e-5
    np.testing.assert_allclose(fast.nll_per_chunk, std.nll_per_chunk, rtol=1e-5)


def test_block_nll_matches_float64_cross_entropy() -> None:
    """The in-place log-sum-exp against an independent float64 cross-entropy of the same logits."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 1000, generator=g) + torch.randn(64, 1, generator=g)
    target = torch.randint(0, 1000, (64,), generator=g)
    expected = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none")
    got = fastforward.block_nll(logits.clone(), target)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=0, atol=2e-6), (got.double() - expected).abs().max()
    got64 = fastforward.block_nll(logits.double(), target)
    assert torch.allclose(got64, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 5, 31, 64])
def test_cross_entropy_blocks_of_any_size(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block boundaries (5 sequences of 31 positions, blocks spanning sequences) change nothing but round-off."""
    model = make_model("mha", dtype=torch.float64)
    toks = _tokens()
    ref = _standard_token_nll(model, toks)
    monkeypatch.setattr(fastforward, "CE_BLOCK_ROWS", rows)
    got = fastpath.fast_token_nll(model, toks)
    assert got is not None and got.dtype == torch.float64
    assert torch.allclose(got, ref, rtol=0, atol=1e-10), (got - ref).abs().max()


@requires_hooked
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "neox_partial_rotary_parallel"])
def test_low_precision_models_stay_close_to_standard(name: str, dtype: torch.dtype) -> None:
    """bf16/fp16 follow TransformerLens' rounding points closely (measured <= 1.6e-4 relative)."""
    model = _cfg_model(dtype, **CONFIGS[name])
    toks = _tokens()
    fast = qs.perplexity(model, toks, batch_size=2, progress=False, fast=True)
    std = qs.perplexity(model, toks, batch_size=2, progress=False, fast=False)
    assert fast.path == "fast"
    assert abs(fast.mean_nll - std.mean_nll) / std.mean_nll < 1e-3
