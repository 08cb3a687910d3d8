from __future__ import annotations

import numpy as np
import pytest
import torch

import qk_subspace as qs
from tests.conftest import assert_params_equal, make_model, param_snapshot


def _fit(kind: str = "mha", **kw):
    model = make_model(kind, **kw)
    W = qs.qk_matrices(model)
    return model, W, qs.HeadPCA().fit(W)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_representatives_are_members_nearest_their_centroid(k: int) -> None:
    _, _W, pca = _fit(n_layers=2, n_heads=4)
    cl = qs.cluster_heads(pca, k, n_dims=5, seed=0)
    flat = cl.assignments.reshape(-1)
    assert cl.assignments.shape == (2, 4) and cl.representatives.shape == (k,)
    assert set(flat.tolist()) == set(range(k))  # no empty cluster for distinct heads
    X = pca.coefficients_[:, :5]
    for c, rep in enumerate(cl.representatives.tolist()):
        members = np.flatnonzero(flat == c)
        assert rep in members  # the representative is a member of its cluster
        centroid = X[members].mean(axis=0)  # k-means centroid = mean of the members (independent)
        np.testing.assert_allclose(cl.centroids[c], centroid, atol=1e-10)
        d = np.linalg.norm(X[members] - centroid, axis=1)
        assert np.linalg.norm(X[rep] - centroid) <= d.min() + 1e-12
    assert cl.n_replaced == 8 - k
    assert cl.replaced_mask.sum() == 8 - k and not (cl.replaced_mask & cl.representative_mask).any()


def test_target_copies_the_representatives_original_circuit() -> None:
    _, W, pca = _fit()
    cl = qs.cluster_heads(pca, 3, n_dims=4, seed=1)
    T = cl.target(W)
    Wf, Tf = W.reshape(-1, 8, 8), T.reshape(-1, 8, 8)
    for h, c in enumerate(cl.assignments.reshape(-1).tolist()):
        assert torch.equal(Tf[h], Wf[cl.representatives[c]])
    for rep in cl.representatives.tolist():
        assert torch.equal(Tf[rep], Wf[rep])
    with pytest.raises(ValueError, match="shape"):
        cl.target(W[:1])


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_injected_clusters_realise_the_target(kind: str) -> None:
    model, W, pca = _fit(kind, n_heads=4, n_kv_heads=2) if kind == "gqa" else _fit(kind)
    cl = qs.cluster_heads(pca, 2, n_dims=3, seed=0)
    snap = param_snapshot(model)
    with qs.inject_qk(model, cl.target(W), heads=torch.as_tensor(cl.replaced_mask)) as edit:
        now = qs.qk_matrices(model)
        assert float(edit.max_abs_error.max()) < 1e-4
    src = cl.source_index()
    ref = W.reshape(-1, *W.shape[-2:])[src].reshape(W.shape)
    assert torch.allclose(now, ref, atol=1e-4, rtol=1e-4)
    assert_params_equal(model, snap)


def test_k_equal_n_heads_changes_nothing(tokens: torch.Tensor) -> None:
    model, W, pca = _fit()
    cl = qs.cluster_heads(pca, 8, n_dims=4)
    assert cl.n_replaced == 0 and sorted(cl.representatives.tolist()) == list(range(8))
    assert torch.equal(cl.target(W), W)
    base = qs.perplexity(model, tokens, progress=False)
    edit = qs.inject_qk(model, cl.target(W), heads=torch.as_tensor(cl.replaced_mask))
    row = qs.evaluation.sweep.evaluate_edit(model, tokens, edit, base, progress=False)
    assert row["ratio"] == 1.0 and float(edit.max_abs_error.max()) == 0.0
    assert cl.mixing().is_identity  # no head replaced: the mixing matrix is I
    # the same through all heads: injecting each head's own circuit is exact to float32 round-off
    row = qs.evaluation.sweep.evaluate_edit(
        model, tokens, qs.inject_qk(model, cl.target(W)), base, progress=False
    )
    assert abs(row["ratio"] - 1) < 1e-5


def test_deterministic_given_seed() -> None:
    _, _, pca = _fit(n_layers=3, n_heads=4)
    a, b = qs.cluster_heads(pca, 4, n_dims=6, seed=3), qs.cluster_heads(pca, 4, n_dims=6, seed=3)
    assert np.array_equal(a.assignments, b.assignments) and np.array_equal(
        a.representatives, b.representatives
    )
    assert a.inertia == b.inertia


def test_validation_errors() -> None:
    _, _, pca = _fit()
    with pytest.raises(ValueError, match=r"k \(number of clusters\) must be in \[1, 8\].*got 0"):
        qs.cluster_heads(pca, 0, n_dims=4)
    with pytest.raises(ValueError, match=r"\[1, 8\].*got 9"):
        qs.cluster_heads(pca, 9, n_dims=4)
    with pytest.raises(TypeError, match="integer"):
        qs.cluster_heads(pca, 2.5, n_dims=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"n_dims must be in \[1, 8\].*got 20"):
        qs.cluster_heads(pca, 2)  # default n_dims=20 > 8 components of 8 heads
    with pytest.raises(RuntimeError, match="not fitted"):
        qs.cluster_heads(qs.HeadPCA(), 2)


def test_sweep_clusters_drops_k_at_or_above_n_heads(tokens: torch.Tensor) -> None:
    model, W, pca = _fit()
    rows: list[dict] = []
    df = qs.sweep_clusters(
        model, pca, tokens, [2, 8, 64], n_dims=4, progress=False, n_boot=100, on_row=rows.append
    )
    assert list(df["k"]) == [2] and list(df["replaced"]) == [6] and len(rows) == 1
    cl = qs.cluster_heads(pca, 2, n_dims=4)
    with qs.inject_qk(model, cl.target(W), heads=torch.as_tensor(cl.replaced_mask)):
        ref = qs.perplexity(model, tokens, progress=False).ppl
    assert df.loc[0, "ppl"] == ref
    assert df.loc[0, "assignments"] == cl.assignments.tolist()
    with pytest.raises(ValueError, match="cluster counts must be integers >= 1"):
        qs.sweep_clusters(model, pca, tokens, [0, 2], n_dims=4, progress=False)
    with pytest.raises(ValueError, match="no cluster count below n_heads=8"):
        qs.sweep_clusters(model, pca, tokens, [8, 16], n_dims=4, progress=False)
