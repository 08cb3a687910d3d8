from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import qk_subspace as qs
from tests.conftest import make_model


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_qk_matrices_match_hand_product(kind: str) -> None:
    model = make_model(kind, n_heads=4, n_kv_heads=2)
    W = qs.qk_matrices(model)
    assert W.shape == (2, 4, 8, 8) and W.dtype == torch.float64
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        W_K = qs.model.weights.kv_weight(model, layer, "W_K")  # one per key/value head
        assert W_K.shape[0] == (2 if kind == "gqa" else 4)
        for h in range(4):
            kv = h // 2 if kind == "gqa" else h
            ref = attn.W_Q[h].double().T @ W_K[kv].double()
            torch.testing.assert_close(W[layer, h], ref, rtol=0, atol=1e-12)
    assert qs.qk_matrices(model, dtype=None).dtype == torch.float32


def test_head_index_helpers() -> None:
    assert qs.model.heads.flat_to_layer_head(31, 12) == (2, 7)
    assert qs.model.heads.layer_head_to_flat(2, 7, 12) == 31
    labels = qs.model.heads.head_labels(12, 12)
    assert labels[3 * 12 + 7] == "L3H7" and len(labels) == 144
    mask = qs.model.heads.parse_heads([(0, 1), 5], 2, 4)
    assert mask.sum() == 2 and mask[0, 1] and mask[1, 1]
    with pytest.raises(ValueError, match="out of range"):
        qs.model.heads.parse_heads([8], 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        qs.model.heads.parse_heads([(2, 0)], 2, 4)


def _random_heads(n: int = 24, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, n // 4, d, d, generator=g, dtype=torch.float64)


def test_headpca_matches_numpy_svd() -> None:
    W = _random_heads()
    pca = qs.HeadPCA().fit(W)
    X = W.reshape(24, -1).numpy()
    Xc = X - X.mean(0)
    s = np.linalg.svd(Xc, compute_uv=False)
    var = s**2 / (len(X) - 1)
    np.testing.assert_allclose(pca.explained_variance_, var[: pca.n_components_], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pca.explained_variance_ratio_, var / var.sum(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(pca.cumulative_variance_, np.cumsum(var / var.sum()), rtol=1e-10)
    assert pca.n_components_ == 24 and pca.n_nonzero_components_ == 23  # centred: n - 1
    k90 = pca.n_components_for(0.9)
    assert pca.cumulative_variance_[k90 - 1] >= 0.9 - 1e-12 and (
        k90 == 1 or pca.cumulative_variance_[k90 - 2] < 0.9
    )


def test_headpca_reconstruction_monotone_and_exact() -> None:
    W = _random_heads()
    pca = qs.HeadPCA().fit(W)
    errs = [pca.reconstruction_error(W, K) for K in range(25)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errs))
    assert errs[23] < 1e-10 and errs[24] < 1e-10  # K >= nonzero components: exact
    mean_head = W.reshape(24, 6, 6).mean(0)
    rec0 = pca.reconstruct(0)
    assert rec0.shape == W.shape
    torch.testing.assert_close(rec0, mean_head.expand_as(W), rtol=0, atol=1e-12)
    # transform / inverse_transform round trip
    C = pca.transform(W)
    np.testing.assert_allclose(C, pca.coefficients_, atol=1e-10)
    torch.testing.assert_close(pca.inverse_transform(C), W.reshape(24, 6, 6), rtol=0, atol=1e-10)
    # explicit component subsets equal the top-K
    torch.testing.assert_close(pca.reconstruct(components=[0, 1, 2]), pca.reconstruct(3))


def test_headpca_validation() -> None:
    W = _random_heads()
    with pytest.raises(RuntimeError, match="not fitted"):
        qs.HeadPCA().reconstruct(1)
    pca = qs.HeadPCA().fit(W)
    with pytest.raises(ValueError, match="K must be in"):
        pca.reconstruct(-1)
    with pytest.raises(ValueError, match="K must be in"):
        pca.reconstruct(25)
    with pytest.raises(TypeError, match="K must be an integer"):
        pca.reconstruct(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \[\.\.\., d, d\]"):
        qs.HeadPCA().fit(torch.zeros(4, 3, 5))
    bad = W.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        qs.HeadPCA().fit(bad)
    with pytest.raises(ValueError, match="threshold"):
        pca.n_components_for(1.5)
