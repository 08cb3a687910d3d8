"""OV circuits: head-space form, exact W_V injection (multi-head and grouped-query), diagnostics."""

from __future__ import annotations

import pytest
import torch

import qk_subspace as qs
from tests.conftest import assert_params_equal, changed_weights, make_model, param_snapshot


def _value_weights(model, layer: int) -> torch.Tensor:
    """The value weight, one per key/value head (the parameter, or on a bridge its view)."""
    return qs.model.weights.kv_weight(model, layer, "W_V")


def _explicit_ov(model) -> torch.Tensor:
    """Independent: W_V[h // r]^T @ W_O[h]^T per head, from the raw parameters, float64."""
    cfg = model.cfg
    r = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    out = torch.empty(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, dtype=torch.float64)
    for layer in range(cfg.n_layers):
        Wv = _value_weights(model, layer).detach().double()
        Wo = model.blocks[layer].attn.W_O.detach().double()
        for h in range(cfg.n_heads):
            out[layer, h] = Wv[h // r].T @ Wo[h].T
    return out


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_ov_matrices_match_parameters(kind: str) -> None:
    model = make_model(kind, dtype=torch.float64)
    W = qs.ov_matrices(model)
    assert W.shape == (2, 4, 8, 8) and W.dtype == torch.float64
    torch.testing.assert_close(W, _explicit_ov(model), rtol=0, atol=1e-12)
    torch.testing.assert_close(W, model.OV.BA.transpose(-1, -2), rtol=0, atol=1e-12)
    torch.testing.assert_close(qs.representations.get("ov").matrices(model), W)
    torch.testing.assert_close(qs.representations.get("qk").matrices(model), qs.qk_matrices(model))
    with pytest.raises(ValueError, match="unknown representation 'vo'"):
        qs.representations.get("vo")


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_ov_injection_identity_float64(kind: str) -> None:
    model = make_model(kind, dtype=torch.float64)
    snap = param_snapshot(model)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    with qs.inject_ov(model, target) as edit:
        assert (qs.ov_matrices(model) - target).abs().max() < 1e-10
        assert (_explicit_ov(model) - target).abs().max() < 1e-10
        assert edit.max_abs_error.max() < 1e-10
        changed = changed_weights(model, snap)
        assert changed and all(k.endswith("W_V") for k in changed), changed  # W_V / _W_V only
        # The part of W_V outside span(U_g) (U_g = the group's stacked W_O^T) is preserved.
        r = 2 if kind == "gqa" else 1
        for layer in range(2):
            Wo = model.blocks[layer].attn.W_O.detach().double()
            new, old = (
                _value_weights(model, layer).detach(),
                snap[qs.model.weights.value_parameter_name(model, layer)],
            )
            for grp in range(new.shape[0]):
                Ug = torch.cat([Wo[grp * r + k].T for k in range(r)], dim=1)  # [d_model, r*d_head]
                P = Ug @ torch.linalg.solve(Ug.T @ Ug, Ug.T)
                outside = torch.eye(P.shape[0], dtype=torch.float64) - P
                torch.testing.assert_close(outside @ new[grp], outside @ old[grp], rtol=0, atol=1e-12)
    assert_params_equal(model, snap)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_ov_k_all_reproduces_logits_and_restores(kind: str, tokens: torch.Tensor) -> None:
    model = make_model(kind)  # float32
    snap = param_snapshot(model)
    with torch.no_grad():
        base = model(tokens)
    pca = qs.HeadPCA().fit(qs.ov_matrices(model))
    with torch.no_grad(), qs.inject_ov(model, pca.reconstruct(pca.n_heads_)) as edit:
        torch.testing.assert_close(model(tokens), base, rtol=0, atol=1e-5)
        assert edit.max_abs_error.max() < 1e-5
    assert_params_equal(model, snap)
    # compression changes the model, and restore is bit for bit even after an exception
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), qs.inject_ov(model, pca.reconstruct(1)):
        assert (model(tokens) - base).abs().max() > 1e-3
        raise RuntimeError("boom")
    assert_params_equal(model, snap)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_ov_edit_leaves_attention_patterns(kind: str, tokens: torch.Tensor) -> None:
    model = make_model(kind)
    names = lambda n: n.endswith("hook_pattern")
    _, base = model.run_with_cache(tokens, names_filter=names)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with qs.inject_ov(model, target):
        _, cache = model.run_with_cache(tokens, names_filter=names)
        _, cache_l1 = model.run_with_cache(tokens, names_filter=names, stop_at_layer=1)
    # layer 0 reads the unedited residual stream: W_V edits leave its patterns bit for bit
    assert torch.equal(cache["blocks.0.attn.hook_pattern"], base["blocks.0.attn.hook_pattern"])
    assert torch.equal(cache_l1["blocks.0.attn.hook_pattern"], base["blocks.0.attn.hook_pattern"])
    # later layers' patterns move only because earlier heads' outputs moved
    assert not torch.equal(cache["blocks.1.attn.hook_pattern"], base["blocks.1.attn.hook_pattern"])


def test_gqa_subset_keeps_siblings_form() -> None:
    model = make_model("gqa", dtype=torch.float64, n_heads=4, n_kv_heads=2)
    before = qs.ov_matrices(model)
    snap = param_snapshot(model)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with qs.inject_ov(model, target, heads=[(0, 1)]) as edit:
        now = qs.ov_matrices(model)
        assert (now[0, 1] - target[0, 1]).abs().max() < 1e-10  # edited head hits its target
        assert (now[0, 0] - before[0, 0]).abs().max() < 1e-10  # sibling (same value head) keeps its form
        torch.testing.assert_close(now[0, 2:], before[0, 2:], rtol=0, atol=0)
        torch.testing.assert_close(now[1], before[1], rtol=0, atol=0)
        v0, v1 = (qs.model.weights.value_parameter_name(model, layer) for layer in (0, 1))
        assert torch.equal(_value_weights(model, 0)[1], snap[v0][1])  # other group untouched
        assert torch.equal(_value_weights(model, 1), snap[v1])
        assert edit.max_abs_error[0, :2].max() < 1e-10 and edit.max_abs_error[0, 2:].abs().max() == 0
    assert_params_equal(model, snap)


def test_gqa_rank_deficient_group_least_squares() -> None:
    # one value head shared by 4 query heads: U_g is 12 x 32, rank 12 < 32 -> cannot be exact
    model = make_model("gqa", dtype=torch.float64, d_model=12, n_heads=4, n_kv_heads=1)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    edit = qs.inject_ov(model, target)
    with pytest.warns(RuntimeWarning, match="least"):
        edit.__enter__()
    try:
        miss = (qs.ov_matrices(model) - target).abs().amax(dim=(-1, -2))
        torch.testing.assert_close(edit.max_abs_error, miss)
        assert edit.max_abs_error.min() > 1e-3  # reported, not hidden
        # least-squares optimality: U_g (U_g^T W_V_new - T_g^T) = 0 (normal equations)
        for layer in range(2):
            Wo = model.blocks[layer].attn.W_O.detach()
            Ug = torch.cat([Wo[h].T for h in range(4)], dim=1)
            Tg = torch.cat([target[layer, h] for h in range(4)], dim=1)  # [d_head, 4 d_head]
            Wv = _value_weights(model, layer)[0].detach()
            assert (Ug @ (Ug.T @ Wv - Tg.T)).abs().max() < 1e-9
    finally:
        edit.restore()
    # K = all still exact (zero correction)
    edit = qs.inject_ov(model, qs.ov_matrices(model))
    with pytest.warns(RuntimeWarning, match="least"):
        edit.__enter__()
    try:
        assert edit.max_abs_error.max() < 1e-10
    finally:
        edit.restore()


def test_head_output_change(tokens: torch.Tensor) -> None:
    model = make_model("mha", dtype=torch.float64)
    W = qs.ov_matrices(model)
    same = qs.evaluation.head_outputs.head_output_change(
        model, tokens, lambda: qs.inject_ov(model, W), progress=False
    )
    assert same["z"].shape == (2, 4) and same["z"].max() < 1e-12 and same["write"].max() < 1e-12
    target = W.clone()
    target[1, 2] = 0.0
    ch = qs.evaluation.head_outputs.head_output_change(
        model, tokens, lambda: qs.inject_ov(model, target, heads=[(1, 2)]), batch_size=3, progress=False
    )
    # independent: the edited head's z from caches
    _, c0 = model.run_with_cache(tokens)
    with qs.inject_ov(model, target, heads=[(1, 2)]):
        _, c1 = model.run_with_cache(tokens)
    z0, z1 = c0["blocks.1.attn.hook_z"][..., 2, :], c1["blocks.1.attn.hook_z"][..., 2, :]
    assert abs(ch["z"][1, 2] - float((z1 - z0).norm() / z0.norm())) < 1e-10
    assert ch["z"][1, 2] > 0.1
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    assert ch["z"][mask.numpy()].max() < 1e-12  # nothing else moves (last layer, W_V edit only)


def test_sweep_k_ov_circuit(tokens: torch.Tensor) -> None:
    model = make_model("gqa")
    pca = qs.HeadPCA().fit(qs.ov_matrices(model))
    df = qs.sweep_k(model, pca, tokens, [0, 3, pca.n_heads_], progress=False, representation="ov", n_boot=100)
    assert df.attrs["k_all_ok"] and df.attrs["circuit"] == "ov"
    assert df["ratio"].iloc[0] > 1.0
    # the K=3 row is an OV injection, not a QK one
    with qs.inject_ov(model, pca.reconstruct(3)):
        direct = qs.perplexity(model, tokens, progress=False)
    assert abs(df["ppl"].iloc[1] - direct.ppl) < 1e-9 * direct.ppl
