from __future__ import annotations

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.edits.circuit import circuit_injection_weights
from qk_subspace.model.weights import attention_factors
from qk_subspace.representations import CircuitHeads
from tests.conftest import assert_params_equal, make_model, param_snapshot

KINDS = {
    "mha": {"kind": "mha"},
    "gqa": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
}


CIRCUIT = qs.representations.get("qk-circuit")


def _model(name: str, dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    return make_model(dtype=dtype, **KINDS[name])  # type: ignore[arg-type]


def circuit_factors(model):  # type: ignore[no-untyped-def]
    return attention_factors(model, ("W_Q", "W_K"))


def circuit_pca(model, groupby=None):  # type: ignore[no-untyped-def]
    """The gauge-invariant PCA of the model's circuits W_Q W_K^T."""
    return qs.HeadPCA(groupby=groupby).fit(CIRCUIT.heads(model))


def explicit_circuits(model) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Every head's invariant circuit as real features ``[n, D]``, written out by hand (independent path):
    ``W_Q W_K^T`` without rotary; with rotary (TransformerLens pairs ``(i, i + d/2)``) the real and
    imaginary parts of ``w_Q w_K^H`` per pair, ``w = W[:, i] + 1j W[:, i + d/2]``."""
    Wq, Wk = (w.reshape(-1, *w.shape[-2:]).numpy() for w in circuit_factors(model))
    if model.cfg.positional_embedding_type != "rotary":
        return np.einsum("nai,nbi->nab", Wq, Wk).reshape(len(Wq), -1)
    half = model.cfg.d_head // 2
    feats = []
    for i in range(half):
        wq, wk = Wq[..., i] + 1j * Wq[..., i + half], Wk[..., i] + 1j * Wk[..., i + half]
        Z = np.einsum("na,nb->nab", wq, wk.conj()).reshape(len(Wq), -1)
        feats += [Z.real, Z.imag]
    return np.concatenate(feats, axis=1)


def as_real_features(rec: torch.Tensor, n: int) -> np.ndarray:
    """A reconstruction (real ``[..., d, d]`` or complex ``[..., parts, d, d]``) as features ``[n, D]``."""
    if not rec.is_complex():
        return rec.reshape(n, -1).numpy()
    Z = rec.reshape(n, rec.shape[-3], -1).numpy()
    return np.concatenate(
        [np.stack([Z[:, p].real, Z[:, p].imag], 1).reshape(n, -1) for p in range(Z.shape[1])], 1
    )


def _explicit_pca(model) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Materialised circuits -> sklearn-convention variances via an explicit SVD (independent path)."""
    C = explicit_circuits(model)
    Xc = C - C.mean(axis=0)
    s = np.linalg.svd(Xc, compute_uv=False)
    ev = s**2 / (len(C) - 1)
    return ev, C


@pytest.mark.parametrize("name", sorted(KINDS))
def test_gram_trick_equals_materialised_circuits(name: str) -> None:
    model = _model(name)
    pca = circuit_pca(model)
    assert pca.engine_ == "gram" and isinstance(pca.heads_, CircuitHeads)
    ev, C = _explicit_pca(model)
    np.testing.assert_allclose(pca.explained_variance_, ev[: pca.n_components_], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pca.gram_, C @ C.T, rtol=1e-11, atol=1e-12)
    # reconstruction as a mixing of heads equals the projection of the explicit circuits
    Xc = C - C.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    explicit = C.mean(axis=0) + Xc @ Vt[:3].T @ Vt[:3]
    got = as_real_features(pca.reconstruct(3), len(C))
    np.testing.assert_allclose(got, explicit, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_circuit_variance_gauge_invariant_raw_not(name: str) -> None:
    model = _model(name)
    circ0 = circuit_pca(model)
    raw0 = qs.HeadPCA().fit(qs.qk_matrices(model))
    for seed in (1, 2):
        with qs.random_gauge(model, seed=seed):
            circ = circuit_pca(model)
            raw = qs.HeadPCA().fit(qs.qk_matrices(model))
        np.testing.assert_allclose(
            circ.explained_variance_ratio_, circ0.explained_variance_ratio_, rtol=0, atol=1e-8
        )
        np.testing.assert_allclose(
            circ.explained_variance_,
            circ0.explained_variance_,
            rtol=1e-8,
            atol=1e-12 * circ0.explained_variance_[0],
        )
        assert np.abs(np.abs(circ.coefficients_) - np.abs(circ0.coefficients_)).max() < 1e-6
        assert np.abs(raw.explained_variance_ratio_ - raw0.explained_variance_ratio_).max() > 1e-3


@pytest.mark.parametrize("name", sorted(KINDS))
def test_circuit_k_all_reproduces_baseline(name: str, tokens: torch.Tensor) -> None:
    model = _model(name, torch.float32)
    snap = param_snapshot(model)
    df = qs.sweep(model, tokens, [0, 2, 8], representation="qk-circuit", progress=False, n_boot=50)
    assert df.attrs["k_all_ok"] and abs(df.attrs["k_all_ratio"] - 1) < 1e-5
    assert df.set_index("K").loc[8, "max_residual"] < 1e-6
    assert df.set_index("K").loc[2, "max_residual"] > 1e-2  # the unrepresentable part is reported
    assert_params_equal(model, snap)


def part_columns(model) -> list[tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """The head dimensions of each circuit part, by hand: every rotary pair (i, i + d/2), or all of them."""
    d = model.cfg.d_head
    if model.cfg.positional_embedding_type != "rotary":
        return [tuple(range(d))]
    return [(i, i + d // 2) for i in range(d // 2)]


def complex_columns(W: np.ndarray, cols: tuple[int, ...]) -> np.ndarray:
    """``W[..., cols]``, a rotary pair as one complex column ``[..., 1]``."""
    if len(cols) == 2 and W.shape[-1] > 2:
        return (W[..., cols[0]] + 1j * W[..., cols[1]])[..., None]
    return W[..., list(cols)]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_injection_is_least_squares_and_residual_is_exact(name: str) -> None:
    model = _model(name)
    pca = circuit_pca(model)
    A = pca.mixing(K=2).matrix()
    Wq, Wk = circuit_factors(model)
    W_new, (err_sq, ref_sq) = circuit_injection_weights(
        Wq, Wk, pca.heads_.gram(), A, layout=pca.heads_.layout
    )
    resid = (err_sq / ref_sq).sqrt()
    rec = pca.reconstruct(2)  # [L, H, d_model, d_model], or [L, H, parts, d_model, d_model] (rotary)
    C_K = rec if rec.is_complex() else rec[:, :, None]
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            err = 0.0
            for p, cols in enumerate(part_columns(model)):
                K_h = complex_columns(Wk[layer, h].numpy(), cols)
                C = C_K[layer, h, p].numpy()
                explicit = np.linalg.lstsq(K_h.conj(), C.T, rcond=None)[0].T  # argmin ||W K^H - C||
                got = complex_columns(W_new[layer, h].numpy(), cols)
                np.testing.assert_allclose(got, explicit, rtol=1e-8, atol=1e-10)
                err += float(np.sum(np.abs(C - explicit @ K_h.conj().T) ** 2))
            total = float(np.sum(np.abs(C_K[layer, h].numpy()) ** 2))
            assert abs(resid[layer, h] - np.sqrt(err / total)) < 1e-7


def test_residual_zero_when_target_in_span_of_W_K(tokens: torch.Tensor) -> None:
    # one key/value head per layer and a per-layer PCA: every C_h(K) lies in span(W_K) of its layer
    model = make_model("gqa", n_heads=4, n_kv_heads=1, dtype=torch.float64)
    pca = circuit_pca(model, groupby="layer")
    for K in (0, 1, 2):
        for realisation in ("query", "joint"):
            with CIRCUIT.edit(model, pca.heads_, pca.mixing(K=K), realisation=realisation) as edit:
                assert edit.residual.max() < 1e-6
                now = CIRCUIT.heads(model)
                np.testing.assert_allclose(
                    as_real_features(
                        now.materialize(qs.representations.DenseMixing(np.eye(now.n_heads))), now.n_heads
                    ),
                    as_real_features(pca.reconstruct(K), now.n_heads),
                    rtol=1e-9,
                    atol=1e-10,
                )


def test_circuit_injection_ppl_is_gauge_invariant(tokens: torch.Tensor) -> None:
    model = _model("gqa")
    pca = circuit_pca(model)  # fitted in the original gauge
    with torch.no_grad():
        with CIRCUIT.edit(model, pca.heads_, pca.mixing(K=2)):
            loss0 = model(tokens, return_type="loss")
        with qs.random_gauge(model, seed=4), CIRCUIT.edit(model, pca.heads_, pca.mixing(K=2)):
            loss1 = model(tokens, return_type="loss")
        with (
            qs.random_gauge(model, seed=4),
            qs.inject_qk(model, qs.HeadPCA().fit(qs.qk_matrices(model)).reconstruct(2)),
        ):
            loss_raw_gauged = model(tokens, return_type="loss")
        with qs.inject_qk(model, qs.HeadPCA().fit(qs.qk_matrices(model)).reconstruct(2)):
            loss_raw = model(tokens, return_type="loss")
    assert abs(float(loss1 - loss0)) < 1e-10
    assert abs(float(loss_raw_gauged - loss_raw)) > 1e-6


def test_head_pca_engines_and_validation() -> None:
    W = qs.qk_matrices(make_model("mha"))
    raw = qs.HeadPCA(3)
    assert type(raw) is qs.HeadPCA and raw.n_components == 3 and raw.groupby is None
    raw.fit(W)
    assert raw.components_.shape[0] == 3 and raw.engine_ == "svd"
    assert circuit_pca(make_model("mha")).engine_ == "gram"
    assert qs.HeadPCA(groupby="layer").fit(W).engine_ == "gram"
    assert qs.HeadPCA(groupby="layer").groupby == "layer"
    with pytest.raises(ValueError, match="engine must be"):
        qs.HeadPCA(engine="canonical")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groupby must be"):
        qs.HeadPCA(groupby="head")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected Heads"):
        qs.HeadPCA().fit(make_model("mha"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs explicit head matrices"):
        qs.HeadPCA(engine="svd").fit(CIRCUIT.heads(make_model("mha")))
    with pytest.raises(RuntimeError, match="not fitted"):
        qs.HeadPCA().mixing(K=1)


def test_svd_and_gram_engines_agree() -> None:
    W = qs.qk_matrices(make_model("mha", n_layers=3, dtype=torch.float64))
    svd, gram = qs.HeadPCA(engine="svd").fit(W), qs.HeadPCA(engine="gram").fit(W)
    np.testing.assert_allclose(svd.explained_variance_, gram.explained_variance_, rtol=1e-9, atol=1e-12)
    for K in (0, 2, 5, 12):
        np.testing.assert_allclose(svd.mixing(K=K).matrix(), gram.mixing(K=K).matrix(), atol=1e-9)
        torch.testing.assert_close(svd.reconstruct(K), gram.reconstruct(K), rtol=1e-9, atol=1e-10)
    assert svd.mixing(K=12).is_identity and gram.mixing(K=12).is_identity


def test_layerwise_pca_equals_separate_fits_per_layer() -> None:
    model = make_model("mha", n_layers=3, dtype=torch.float64)
    W = qs.qk_matrices(model)
    lw = qs.HeadPCA(groupby="layer").fit(W)
    assert lw.engine_ == "gram"
    rec = lw.reconstruct(2)
    for layer in range(3):
        sk = qs.HeadPCA().fit(W[layer][None])
        np.testing.assert_allclose(
            lw.explained_variance_[layer], sk.explained_variance_, rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(rec[layer], sk.reconstruct(2)[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(
            lw.reconstruct(0)[layer], W[layer].mean(0).expand_as(W[layer]), rtol=0, atol=1e-12
        )
    torch.testing.assert_close(lw.reconstruct(4), W, rtol=0, atol=1e-12)
    # global measure: 1 - SSE/SST about the global mean, checked explicitly
    sst = float(((W - W.reshape(-1, 8, 8).mean(0)) ** 2).sum())
    assert abs(lw.global_variance_explained(2) - (1 - float(((W - rec) ** 2).sum()) / sst)) < 1e-10
    assert lw.n_components_for(1.0) <= 4 and lw.n_components_for(1e-9) == 1
    # the pooled within-layer fraction
    lam = lw.eigvals_
    assert abs(lw.variance_explained(1) - lam[:, :1].sum() / lam.sum()) < 1e-12


def test_parameter_count_and_matching() -> None:
    # stories260K shape: 5 layers x 8 heads, d_head 8 -> D = 64
    assert qs.decomposition.storage.pca_parameter_count(1, 64, 40, n_groups=5) == 5 * (64 + 64) + 40
    assert qs.decomposition.storage.pca_parameter_count(5, 64, 40) == 64 + 5 * 64 + 200
    assert qs.decomposition.storage.matched_global_k(1, 64, 40, 5, max_k=40) == 5  # 64 + 104 K <= 680
    assert qs.decomposition.storage.pca_parameter_count(
        qs.decomposition.storage.matched_global_k(7, 64, 40, 5, 40), 64, 40
    ) <= qs.decomposition.storage.pca_parameter_count(7, 64, 40, 5)


def test_sweep_raw_matches_sweep_k_and_layerwise_all(tokens: torch.Tensor) -> None:
    model = make_model("mha")
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    a = qs.sweep_k(model, pca, tokens, [0, 3], progress=False, n_boot=50)
    b = qs.sweep(model, tokens, [0, 3], representation="qk", progress=False, n_boot=50)
    np.testing.assert_allclose(a["ratio"], b["ratio"], rtol=1e-12)
    lw = qs.sweep(model, tokens, [0, 4], representation="qk", groupby="layer", progress=False, n_boot=50)
    assert lw.attrs["k_all_ok"]
    can = qs.sweep(model, tokens, [8], representation="qk-canonical", progress=False, n_boot=50)
    assert can.attrs["k_all_ok"]
    cmp = qs.evaluation.sweeps.compare_layerwise_global(model, tokens, [0, 1], progress=False, n_boot=50)
    assert set(cmp["groupby"]) == {"layer", "none"}
    by = cmp.set_index(["groupby", "K_layer"])["n_params"]
    assert by[("none", 1)] <= by[("layer", 1)]
