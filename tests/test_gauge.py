from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.edits.gauge import gauge_plan, random_gauge_matrices
from qk_subspace.model import backends
from tests.conftest import assert_params_equal, make_model, param_snapshot, requires_hooked


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _rotary_model(rotary_dim: int, adjacent: bool, dtype: torch.dtype = torch.float32) -> Any:
    """Rotary HookedTransformer with non-rotated head dims and/or GPT-J style adjacent pairs, biases
    non-zero (partial and adjacent rotary exist on HookedTransformer configs only)."""
    if not backends.has_hooked_transformer():
        pytest.skip("partial/adjacent rotary configurations need HookedTransformer (transformer-lens 3.x)")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shape = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50)
    cfg = HookedTransformerConfig(
        **shape,
        seed=0,
        dtype=dtype,
        device="cpu",
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim,
        rotary_adjacent_pairs=adjacent,
        n_key_value_heads=2,
        gated_mlp=True,
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("b_Q", "_b_K", "b_K"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


MODELS = {
    "mha": lambda dt: make_model("mha", dtype=dt),
    "gqa_rotary": lambda dt: make_model("gqa", n_heads=4, n_kv_heads=2, dtype=dt),
    "gqa_rotary_kv1": lambda dt: make_model("gqa", n_heads=4, n_kv_heads=1, dtype=dt),
    "rotary_partial_adjacent": lambda dt: _rotary_model(4, True, dt),
    "rotary_partial_neox": lambda dt: _rotary_model(6, False, dt),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_gauge_keeps_logits_and_restores_bit_for_bit(name: str, tokens: torch.Tensor) -> None:
    model = MODELS[name](torch.float32)
    snap = param_snapshot(model)
    with torch.no_grad():
        base = model(tokens)
        W0 = qs.qk_matrices(model)
        with qs.random_gauge(model, seed=3, cond=10.0) as g:
            out = model(tokens)
            W1 = qs.qk_matrices(model)
            assert g.G is not None and torch.linalg.cond(g.G).max() <= 10.0 + 1e-9
    assert _rel(out, base) < 1e-5
    assert _rel(W1, W0) > 0.1  # the raw W_Q^T W_K does change
    assert_params_equal(model, snap)


def test_random_gauge_restores_on_exception(mha_model: Any) -> None:
    snap = param_snapshot(mha_model)
    with pytest.raises(RuntimeError, match="boom"), qs.random_gauge(mha_model, seed=0):
        raise RuntimeError("boom")
    assert_params_equal(mha_model, snap)


def _rotary_matrices(model: Any, n_pos: int = 12) -> torch.Tensor:
    """M_p ([n_pos, d_head, d_head]) with rotated(x) = x M_p, read off the library's own rotary: TransformerLens'
    apply_rotary, or on a bridge Hugging Face's rotary embedding and apply_rotary_pos_emb."""
    attn = model.blocks[0].attn
    d = model.cfg.d_head
    eye = torch.eye(d, dtype=torch.float64)
    x = eye[None, None].expand(1, n_pos, d, d).reshape(1, n_pos, d, d)  # [batch, pos, "head"=basis, d]
    if backends.name_of(model) == "bridge":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = model.original_model.model.rotary_emb(x, torch.arange(n_pos)[None])
        q = x.transpose(1, 2)  # [batch, "head"=basis, pos, d]
        out, _ = apply_rotary_pos_emb(q, q, cos.double(), sin.double())
        return out.transpose(1, 2)[0]
    attn_sin, attn_cos = attn.rotary_sin, attn.rotary_cos
    with torch.no_grad():
        attn.rotary_sin, attn.rotary_cos = attn_sin.double(), attn_cos.double()
        try:
            out = attn.apply_rotary(x)
        finally:
            attn.rotary_sin, attn.rotary_cos = attn_sin, attn_cos
    return out[0]  # row i of M_p is the image of basis vector i


@pytest.mark.parametrize("name", ["gqa_rotary", "rotary_partial_adjacent", "rotary_partial_neox"])
def test_rotary_gauges_commute_with_the_rotations(name: str) -> None:
    model = MODELS[name](torch.float64)
    M = _rotary_matrices(model)
    assert not torch.allclose(M[3], torch.eye(model.cfg.d_head, dtype=torch.float64))  # rotations are real
    G = random_gauge_matrices(model, seed=1)
    for Gi in G.flatten(0, 1):
        torch.testing.assert_close(Gi @ M, M @ Gi, rtol=0, atol=1e-12)


def test_a_generic_gauge_breaks_a_rotary_model(tokens: torch.Tensor) -> None:
    # negative control: the commuting restriction is necessary, not decoration
    model = MODELS["gqa_rotary"](torch.float64)
    n_kv = model.cfg.n_key_value_heads
    g = torch.Generator().manual_seed(0)
    G = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(2, n_kv, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        base = model(tokens)
        with qs.ParameterEdit(model, gauge_plan(model, G)):
            out = model(tokens)
    assert _rel(out, base) > 1e-3


def test_gqa_one_gauge_per_key_value_group() -> None:
    model = MODELS["gqa_rotary"](torch.float64)
    Wq0 = model.blocks[1].attn.W_Q.detach().clone()
    with qs.random_gauge(model, seed=2) as g:
        Wq1 = model.blocks[1].attn.W_Q.detach()
        rep = model.cfg.n_heads // model.cfg.n_key_value_heads
        for h in range(model.cfg.n_heads):
            torch.testing.assert_close(Wq1[h], Wq0[h] @ g.G[1, h // rep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_canonical_gauge_preserves_model_and_is_gauge_invariant(name: str, tokens: torch.Tensor) -> None:
    model = MODELS[name](torch.float64)
    snap = param_snapshot(model)
    with torch.no_grad():
        base = model(tokens)
        with qs.canonical_gauge(model):
            assert _rel(model(tokens), base) < 1e-10
            W_canon = qs.qk_matrices(model)
        with qs.random_gauge(model, seed=7), qs.canonical_gauge(model):
            W_canon_after_gauge = qs.qk_matrices(model)
    torch.testing.assert_close(W_canon_after_gauge, W_canon, rtol=0, atol=1e-8)
    assert_params_equal(model, snap)


def test_canonical_gauge_is_the_balanced_svd_factorisation() -> None:
    model = make_model("mha", dtype=torch.float64)
    attn = model.blocks[0].attn
    Q = torch.cat([attn.W_Q.detach(), attn.b_Q.detach()[:, None]], dim=1)  # [h, d_model+1, d_head]
    K = torch.cat([attn.W_K.detach(), attn.b_K.detach()[:, None]], dim=1)
    with qs.canonical_gauge(model) as edit:
        Qn = torch.cat([attn.W_Q.detach(), attn.b_Q.detach()[:, None]], dim=1)
        Kn = torch.cat([attn.W_K.detach(), attn.b_K.detach()[:, None]], dim=1)
        s = torch.linalg.svdvals(Q @ K.transpose(-1, -2))[:, : model.cfg.d_head]
        torch.testing.assert_close(edit.singular_values[0], s, rtol=1e-10, atol=1e-12)
        for h in range(model.cfg.n_heads):
            torch.testing.assert_close(Qn[h].T @ Qn[h], torch.diag(s[h]), rtol=0, atol=1e-10)
            torch.testing.assert_close(Kn[h].T @ Kn[h], torch.diag(s[h]), rtol=0, atol=1e-10)
            torch.testing.assert_close(Qn[h] @ Kn[h].T, Q[h] @ K[h].T, rtol=0, atol=1e-12)


def test_canonical_gauge_rotary_modes(tokens: torch.Tensor) -> None:
    model = MODELS["gqa_rotary"](torch.float64)
    with pytest.raises(ValueError, match="rotary"):
        qs.canonical_gauge(model, rotary="error")
    with pytest.raises(ValueError, match="rotary must be"):
        qs.canonical_gauge(model, rotary="nope")  # type: ignore[arg-type]
    with torch.no_grad():
        base = model(tokens)
        with pytest.warns(RuntimeWarning, match="CHANGE"):
            edit = qs.canonical_gauge(model, rotary="svd")
        with edit:
            assert _rel(model(tokens), base) > 1e-4  # documented: the SVD basis breaks a rotary model


@requires_hooked
def test_unsupported_models_are_refused() -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shape = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=20)
    cfg = HookedTransformerConfig(**shape, act_fn="gelu", attn_only=True, use_qk_norm=True, device="cpu")
    model = HookedTransformer(cfg)
    with pytest.raises(ValueError, match="qk_norm"):
        qs.random_gauge(model)
    with pytest.raises(ValueError, match="cond"):
        qs.random_gauge(make_model("mha"), cond=0.5)


def test_rotary_pairs_follow_transformer_lens_convention() -> None:
    assert qs.edits.gauge.rotary_pairs(MODELS["rotary_partial_adjacent"](torch.float32)) == [(0, 1), (2, 3)]
    assert qs.edits.gauge.rotary_pairs(MODELS["rotary_partial_neox"](torch.float32)) == [
        (0, 3),
        (1, 4),
        (2, 5),
    ]
    assert qs.edits.gauge.rotary_pairs(make_model("mha")) == []


def test_gauge_study_tiny(tokens: torch.Tensor) -> None:
    model = make_model("gqa", dtype=torch.float64)
    st = qs.gauge_study(model, tokens, [0, 2, 8], n_gauges=1, progress=False, n_boot=50)
    assert st.baseline_ok and st.baseline_max_rel_change < 1e-10
    spread = st.spread.set_index(["space", "K"])
    assert spread.loc[("circuit", 2), "ratio_max_rel_dev"] < 1e-8
    assert spread.loc[("circuit", 2), "variance_max_abs_dev"] < 1e-8
    assert spread.loc[("raw", 2), "variance_max_abs_dev"] > 1e-3
    assert np.allclose(spread.xs(8, level="K")["ratio_max"], 1.0, atol=1e-10)  # K = all
    fig = qs.viz.gauge.gauge_figure(st)
    assert len(fig.data) == 2 * 2 * 2  # (space x gauge) x (variance, ratio)
    summary = st.summary()
    assert set(summary) >= {"config", "baselines", "spread", "table"}
