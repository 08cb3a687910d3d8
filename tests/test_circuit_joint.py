"""The joint circuit-space edit: Eckart-Young optimal, never worse than W_Q-only least squares, exact at
K = all, gauge-covariant (on rotary models for the rotary-commuting gauges)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.edits.circuit import circuit_injection_weights
from qk_subspace.edits.circuit_joint import joint_circuit_factors
from qk_subspace.model.weights import attention_factors
from qk_subspace.representations import DenseMixing
from tests.conftest import assert_params_equal, make_model, param_snapshot
from tests.test_circuit_pca import complex_columns, part_columns

CIRCUIT = qs.representations.get("qk-circuit")
KINDS = {"mha": {"kind": "mha"}, "gqa": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2}}


def _model(name: str, dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    return make_model(dtype=dtype, **KINDS[name])  # type: ignore[arg-type]


def best_rank(T: np.ndarray, r: int) -> np.ndarray:
    """Eckart-Young: the closest rank-``r`` matrix to ``T`` (numpy SVD, real or complex)."""
    U, s, Vh = np.linalg.svd(T, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r]


def random_mixing(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n)) / np.sqrt(n)


def test_joint_realisation_is_the_best_rank_d_head_approximation_mha() -> None:
    model = _model("mha")
    Wq, Wk = attention_factors(model)
    n = Wq.shape[0] * Wq.shape[1]
    A = random_mixing(n, 0)
    C = np.einsum("nai,nbi->nab", *(w.reshape(n, *w.shape[-2:]).numpy() for w in (Wq, Wk)))
    with CIRCUIT.edit(model, CIRCUIT.heads(model), DenseMixing(A)) as edit:
        Wq2, Wk2 = attention_factors(model)
    realised = np.einsum("nai,nbi->nab", *(w.reshape(n, *w.shape[-2:]).numpy() for w in (Wq2, Wk2)))
    err = []
    for h in range(n):
        T = np.tensordot(A[h], C, axes=1)
        opt = best_rank(T, model.cfg.d_head)
        np.testing.assert_allclose(realised[h], opt, rtol=0, atol=1e-8 * np.abs(T).max())
        err.append(np.linalg.norm(T - opt) / np.linalg.norm(T))
    np.testing.assert_allclose(edit.residual.flatten().numpy(), err, rtol=1e-6, atol=1e-10)


def test_grouped_query_joint_realisation_is_the_stacked_optimum() -> None:
    # no rotary, 2 query heads per key/value head: the shared W_K' is the best rank-d row space of the
    # stacked targets, and each W_Q'_h the least-squares fit against it
    gen = torch.Generator().manual_seed(0)
    L, H, dm, dh, rep = 2, 4, 12, 3, 2
    Wq = torch.randn(L, H, dm, dh, generator=gen, dtype=torch.float64)
    Wk = torch.randn(L, H // rep, dm, dh, generator=gen, dtype=torch.float64).repeat_interleave(rep, dim=1)
    A = random_mixing(L * H, 1)
    Wq2, Wk2, err_sq, _ = joint_circuit_factors(Wq, Wk, A, repeats=rep)
    C = (Wq @ Wk.mT).reshape(L * H, dm, dm).numpy()
    for layer in range(L):
        for g in range(H // rep):
            heads = [layer * H + g * rep + i for i in range(rep)]
            T = np.concatenate([np.tensordot(A[h], C, axes=1) for h in heads])  # [rep*dm, dm]
            opt = best_rank(T, dh)
            got = np.concatenate([(Wq2[layer, g * rep + i] @ Wk2[layer, g].T).numpy() for i in range(rep)])
            np.testing.assert_allclose(got, opt, rtol=0, atol=1e-8 * np.abs(T).max())
            np.testing.assert_allclose(
                float(err_sq[layer, g * rep : (g + 1) * rep].sum()), np.sum((T - opt) ** 2), rtol=1e-8
            )
    # alternating least squares from the original keys never beats the closed form
    for layer in range(L):
        for g in range(H // rep):
            hs = slice(g * rep, (g + 1) * rep)
            T = torch.cat(
                [torch.from_numpy(np.tensordot(A[layer * H + g * rep + i], C, axes=1)) for i in range(rep)]
            )
            K = Wk[layer, g * rep].clone()
            for _ in range(30):
                Q = T @ K @ torch.linalg.inv(K.T @ K)  # [rep*dm, dh]
                K = T.T @ Q @ torch.linalg.inv(Q.T @ Q)
            als = float(((T - Q @ K.T) ** 2).sum())
            assert float(err_sq[layer, hs].sum()) <= als * (1 + 1e-9)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_rotary_pairs_are_realised_at_their_rank_one_optimum(name: str) -> None:
    model = _model(name)
    heads = CIRCUIT.heads(model)
    n, rep = heads.n_heads, qs.model.weights.kv_groups(model)[1]
    A = random_mixing(n, 2)
    Wq, Wk = (w.reshape(n, *w.shape[-2:]).numpy() for w in attention_factors(model))
    with CIRCUIT.edit(model, heads, DenseMixing(A)):
        Wq2, Wk2 = (w.reshape(n, *w.shape[-2:]).numpy() for w in attention_factors(model))
    for cols in part_columns(model):
        Qp, Kp = complex_columns(Wq, cols), complex_columns(Wk, cols)
        Q2, K2 = complex_columns(Wq2, cols), complex_columns(Wk2, cols)
        C = Qp @ Kp.conj().transpose(0, 2, 1)
        for g in range(n // rep):
            hs = range(g * rep, (g + 1) * rep)
            T = np.concatenate([np.tensordot(A[h], C, axes=1) for h in hs])
            got = np.concatenate([Q2[h] @ K2[h].conj().T for h in hs])
            np.testing.assert_allclose(got, best_rank(T, Qp.shape[-1]), rtol=0, atol=1e-8 * np.abs(T).max())
            for h in hs:  # the group shares one key factor
                np.testing.assert_array_equal(K2[h], K2[hs[0]])


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_residual_never_exceeds_query_only_least_squares(name: str, seed: int) -> None:
    model = _model(name)
    heads = CIRCUIT.heads(model)
    pca = qs.HeadPCA().fit(heads)
    rng = np.random.default_rng(seed)
    rep = qs.model.weights.kv_groups(model)[1]
    for mixing in (pca.mixing(K=int(rng.integers(0, 8))), DenseMixing(random_mixing(heads.n_heads, seed))):
        with CIRCUIT.edit(model, heads, mixing, realisation="joint") as joint:
            pass
        _, (err_q, ref_q) = circuit_injection_weights(
            heads.W_Q, heads.W_K, heads.gram(), mixing.matrix(), layout=heads.layout
        )
        # per key/value group (per head without grouped-query attention)
        joint_sq = (joint.residual**2 * ref_q).reshape(-1, rep).sum(-1)
        assert torch.all(joint_sq <= err_q.reshape(-1, rep).sum(-1) * (1 + 1e-9) + 1e-12)
        assert joint.residual_total <= float((err_q.sum() / ref_q.sum()).sqrt()) + 1e-12


@pytest.mark.parametrize("name", sorted(KINDS))
def test_k_all_is_exact_and_weights_come_back(name: str, tokens: torch.Tensor) -> None:
    model = _model(name)
    snap = param_snapshot(model)
    heads = CIRCUIT.heads(model)
    Wq0, Wk0 = attention_factors(model)
    with CIRCUIT.edit(model, heads, qs.HeadPCA().fit(heads).mixing(K=heads.n_heads)) as edit:
        Wq, Wk = attention_factors(model)
        assert float(edit.residual.max()) < 1e-12
    assert float((Wq - Wq0).abs().max()) < 1e-12 and float((Wk - Wk0).abs().max()) < 1e-12
    assert_params_equal(model, snap)
    df = qs.sweep(
        _model(name, torch.float32), tokens, [0, 2, 8], representation="qk-circuit", progress=False, n_boot=50
    )
    assert df.attrs["k_all_ok"] and abs(df.attrs["k_all_ratio"] - 1) < 1e-5
    assert df.set_index("K").loc[2, "residual_total"] > 1e-2
    assert len(df.set_index("K").loc[2, "residual_per_head"]) == 2  # [n_layers][n_heads]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_edited_model_is_the_same_function_in_every_gauge(name: str, tokens: torch.Tensor) -> None:
    # circuits fitted once; the edit realised in the model as loaded and under random gauges (on the
    # rotary model these are the rotary-commuting ones): the same loss, while raw injection moves
    model = _model(name)
    pca = qs.HeadPCA().fit(CIRCUIT.heads(model))
    with torch.no_grad():
        with CIRCUIT.edit(model, pca.heads_, pca.mixing(K=2)):
            loss0 = float(model(tokens, return_type="loss"))
        for seed in (3, 4):
            with qs.random_gauge(model, seed=seed):
                with CIRCUIT.edit(model, pca.heads_, pca.mixing(K=2)):
                    loss = float(model(tokens, return_type="loss"))
                refit = qs.HeadPCA().fit(CIRCUIT.heads(model))  # refitted in the gauge: same PCA
                with CIRCUIT.edit(model, refit.heads_, refit.mixing(K=2)):
                    loss_refit = float(model(tokens, return_type="loss"))
            assert abs(loss - loss0) < 1e-9 and abs(loss_refit - loss0) < 1e-9


def test_rotary_circuit_is_fixed_by_commuting_gauges_only() -> None:
    # the per-pair circuits do not move under the gauges that preserve a rotary model; a gauge that
    # mixes two pairs changes the model and the circuits (the offset-0 W_Q W_K^T would not see it)
    model = _model("gqa")
    f0 = CIRCUIT.heads(model).gram()
    with qs.random_gauge(model, seed=5):
        np.testing.assert_allclose(CIRCUIT.heads(model).gram(), f0, rtol=1e-10, atol=1e-12)
    Wq, Wk = attention_factors(model)
    d = model.cfg.d_head
    G = torch.eye(d, dtype=torch.float64)
    G[0, 1] = 0.7  # couples pairs (0, d/2) and (1, d/2 + 1)
    Wq2, Wk2 = Wq @ G, Wk @ torch.linalg.inv(G).T
    torch.testing.assert_close(Wq2 @ Wk2.mT, Wq @ Wk.mT)  # the offset-0 circuit is blind to it
    moved = qs.representations.CircuitHeads(Wq2, Wk2, layout=CIRCUIT.heads(model).layout).gram()
    assert np.abs(moved - f0).max() > 1e-3


def test_realisation_option_is_checked() -> None:
    model = _model("mha")
    heads = CIRCUIT.heads(model)
    mixing = qs.HeadPCA().fit(heads).mixing(K=1)
    with pytest.raises(ValueError, match="realisation must be one of"):
        CIRCUIT.edit(model, heads, mixing, realisation="svd")
    with pytest.raises(TypeError, match="only the option 'realisation'"):
        CIRCUIT.edit(model, heads, mixing, method="pinv")
    with pytest.raises(ValueError, match="rotary pair"):
        CIRCUIT.edit(
            _model("gqa"), qs.representations.CircuitHeads(*attention_factors(_model("gqa"))), mixing
        )
