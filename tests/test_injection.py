from __future__ import annotations

import pytest
import torch

import qk_subspace as qs
from tests.conftest import assert_params_equal, changed_weights, make_model, param_snapshot

SHAPES = [
    ("mha", dict(d_model=32, n_heads=4, d_head=8)),
    ("mha", dict(d_model=24, n_heads=3, d_head=16)),
    ("gqa", dict(d_model=32, n_heads=4, d_head=8, n_kv_heads=2)),
    ("gqa", dict(d_model=48, n_heads=6, d_head=8, n_kv_heads=3)),
    ("gqa", dict(d_model=32, n_heads=4, d_head=8, n_kv_heads=1)),
]


def _random_target(model, seed: int = 0) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, generator=g, dtype=torch.float64)


def _independent_qk(model) -> torch.Tensor:
    """W_Q^T W_K from the parameters, by hand (independent of qk_matrices / model.QK)."""
    out = []
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        W_K = qs.model.weights.kv_weight(model, layer, "W_K")  # the parameter: one per key/value head
        rep = model.cfg.n_heads // W_K.shape[0]
        W_K = W_K.detach().double().repeat_interleave(rep, dim=0)
        out.append(attn.W_Q.detach().double().transpose(-1, -2) @ W_K)
    return torch.stack(out)


@pytest.mark.parametrize("kind,shape", SHAPES)
def test_injection_identity_float64(kind: str, shape: dict) -> None:
    model = make_model(kind, dtype=torch.float64, **shape)
    target = _random_target(model)
    with qs.inject_qk(model, target) as edit:
        torch.testing.assert_close(_independent_qk(model), target, rtol=0, atol=1e-10)
        assert edit.max_abs_error.max() < 1e-10


@pytest.mark.parametrize("kind,shape", SHAPES)
def test_injection_identity_float32(kind: str, shape: dict) -> None:
    model = make_model(kind, dtype=torch.float32, **shape)
    target = _random_target(model)
    with qs.inject_qk(model, target) as edit:
        got = _independent_qk(model)
        rel = (got - target).norm(dim=(-1, -2)) / target.norm(dim=(-1, -2))
        assert rel.max() < 1e-5
        assert edit.max_abs_error.max() > 0  # float32 round-off is reported, not hidden


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_null_space_part_preserved_and_biases_untouched(kind: str) -> None:
    model = make_model(kind, dtype=torch.float64)
    target = _random_target(model, seed=3)
    before = param_snapshot(model)
    with qs.inject_qk(model, target):
        for layer, block in enumerate(model.blocks):
            W_K = qs.model.weights.attention_weight(model, layer, "W_K").detach()
            # projector onto the orthogonal complement of span(W_K) in d_model space, per head
            P = W_K @ torch.linalg.pinv(W_K)
            I = torch.eye(W_K.shape[1], dtype=W_K.dtype)
            old = before[f"blocks.{layer}.attn.W_Q"]
            new = block.attn.W_Q.detach()
            torch.testing.assert_close((I - P) @ new, (I - P) @ old, rtol=0, atol=1e-10)
        assert changed_weights(model, before) == {f"blocks.{layer}.attn.W_Q" for layer in range(2)}
    assert_params_equal(model, before)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_current_target_is_bit_identical(kind: str, tokens: torch.Tensor) -> None:
    model = make_model(kind)
    before = param_snapshot(model)
    logits = model(tokens)
    with qs.inject_qk(model, qs.qk_matrices(model)):
        assert_params_equal(model, before)
        assert torch.equal(model(tokens), logits)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_k_all_reconstruction_reproduces_logits_and_pinv_does_not(kind: str, tokens: torch.Tensor) -> None:
    model = make_model(kind)
    logits = model(tokens)
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)
    rec = pca.reconstruct(pca.n_heads_)
    with qs.inject_qk(model, rec):
        assert (model(tokens) - logits).abs().max() < 1e-6
    with qs.inject_qk(model, rec, method="pinv") as edit:
        assert edit.max_abs_error.max() < 1e-4  # it does realise the target ...
        assert (model(tokens) - logits).abs().max() > 1e-3  # ... but not the model


def test_restore_after_exception_interrupt_and_nesting(mha_model, tokens: torch.Tensor) -> None:
    model = mha_model
    before = param_snapshot(model)
    target = _random_target(model)
    with pytest.raises(ZeroDivisionError), qs.inject_qk(model, target):
        1 / 0
    assert_params_equal(model, before)
    with pytest.raises(KeyboardInterrupt), qs.inject_qk(model, target):
        raise KeyboardInterrupt
    assert_params_equal(model, before)
    with qs.inject_qk(model, target):
        mid = param_snapshot(model)
        with qs.inject_qk(model, _random_target(model, 1), heads=[(1, 2)]) as inner:
            assert inner.heads.sum() == 1
            assert not torch.equal(model.blocks[1].attn.W_Q.detach(), mid["blocks.1.attn.W_Q"])
        assert_params_equal(model, mid)
    assert_params_equal(model, before)


def test_heads_subset_edits_only_those(mha_model) -> None:
    model = mha_model
    before = param_snapshot(model)
    target = _random_target(model)
    with qs.inject_qk(model, target, heads=[(0, 1), (1, 3)]) as edit:
        Wq0 = model.blocks[0].attn.W_Q.detach()
        for h in range(4):
            same = torch.equal(Wq0[h], before["blocks.0.attn.W_Q"][h])
            assert same == (h != 1)
        assert (edit.max_abs_error > 0).sum() == 2
    assert_params_equal(model, before)


def test_bad_targets_and_singular_heads(mha_model) -> None:
    model = mha_model
    with pytest.raises(ValueError, match="shape"):
        qs.inject_qk(model, torch.zeros(2, 4, 8))
    with pytest.raises(TypeError, match="floating"):
        qs.inject_qk(model, torch.zeros(2, 4, 8, 8, dtype=torch.long))
    t = _random_target(model)
    t[1, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qs.inject_qk(model, t)
    with pytest.raises(ValueError, match="method"):
        qs.inject_qk(model, _random_target(model), method="lstsq")  # type: ignore[arg-type]
    before = param_snapshot(model)
    with torch.no_grad():
        model.blocks[1].attn.W_K[2, :, 0] = 0.0  # rank-deficient W_K for L1H2
    before = param_snapshot(model)
    with pytest.raises(ValueError, match="L1H2"), qs.inject_qk(model, _random_target(model)):
        pass
    assert_params_equal(model, before)


def test_badly_conditioned_head_warns(mha_model) -> None:
    model = mha_model
    with torch.no_grad():
        model.blocks[0].attn.W_K[3, :, 0] *= 1e-5  # cond(W_K^T W_K) ~ 1e10
    with pytest.warns(RuntimeWarning, match="L0H3"), qs.inject_qk(model, qs.qk_matrices(model)):
        pass
