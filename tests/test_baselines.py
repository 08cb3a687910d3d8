from __future__ import annotations

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.decomposition.nulls import marchenko_pastur_quantiles
from tests.conftest import assert_params_equal, make_model, param_snapshot


@pytest.mark.parametrize("space", ["raw", "circuit"])
def test_random_subspace_variance_is_k_over_r_in_expectation(space: str) -> None:
    model = make_model("mha", n_layers=3, dtype=torch.float64)  # 12 heads -> r = 11
    rep = qs.representations.get("qk" if space == "raw" else "qk-circuit")
    pca = qs.HeadPCA(engine="gram").fit(rep.heads(model))
    r = pca.n_nonzero_components_
    assert r == 11
    n_seeds = 400
    df = qs.decomposition.nulls.random_subspace_variance(pca, [1, 4, 8], n_seeds=n_seeds, seed=0)
    for K, grp in df.groupby("K"):
        v = grp["variance"].to_numpy()
        se = v.std(ddof=1) / np.sqrt(n_seeds)
        assert abs(v.mean() - K / r) < 4 * se + 1e-12, (K, v.mean(), K / r, se)
        # and the top-K PCA subspace keeps at least as much as any random one
        assert v.max() <= pca.variance_explained(int(K)) + 1e-12


def test_ambient_random_subspace_is_k_over_d() -> None:
    W = qs.qk_matrices(make_model("mha", n_layers=3, d_head=4, d_model=16, dtype=torch.float64))  # D = 16
    df = qs.decomposition.nulls.random_subspace_variance(W, [2, 8], n_seeds=400, seed=1, within="ambient")
    for K, grp in df.groupby("K"):
        v = grp["variance"].to_numpy()
        assert abs(v.mean() - K / 16) < 4 * v.std(ddof=1) / np.sqrt(len(v))


def test_random_mixing_full_span_reproduces_and_layer_groups(tokens: torch.Tensor) -> None:
    model = make_model("gqa", dtype=torch.float64)
    pca = qs.HeadPCA(groupby="layer").fit(qs.representations.get("qk-circuit").heads(model))
    mixing, kept = pca.random_mixing(pca.n_components_, np.random.default_rng(0))
    np.testing.assert_allclose(mixing.matrix(), np.eye(pca.n_heads_), atol=1e-12)
    assert kept == pytest.approx(1.0)
    A = pca.random_mixing(1, np.random.default_rng(0))[0].matrix()
    # block-diagonal: no head mixes with another layer's heads
    assert np.abs(A[:4, 4:]).max() == 0 and np.abs(A[4:, :4]).max() == 0


def test_random_subspace_sweep_rows_and_restores(tokens: torch.Tensor) -> None:
    model = make_model("mha")
    snap = param_snapshot(model)
    for space in ("qk", "qk-circuit"):
        df = qs.evaluation.sweeps.random_subspace_sweep(
            model, tokens, [1, 7], representation=space, n_seeds=2, progress=False, n_boot=50
        )
        assert len(df) == 4 and set(df["K"]) == {1, 7}
        assert np.allclose(df[df.K == 7]["ratio"], 1.0, atol=1e-5)  # K = all components: exact
        summ = qs.decomposition.nulls.summarize_random(df)
        assert {"ratio_mean", "ratio_std", "variance_min", "variance_max"} <= set(summ.columns)
    amb = qs.evaluation.sweeps.random_subspace_sweep(
        model, tokens, [2], representation="qk", within="ambient", n_seeds=1, progress=False, n_boot=50
    )
    assert 0 < amb["variance"].iloc[0] < 1
    with pytest.raises(ValueError, match="ambient"):
        qs.evaluation.sweeps.random_subspace_sweep(
            model, tokens, [2], representation="qk-circuit", within="ambient", progress=False
        )
    assert_params_equal(model, snap)


def test_marchenko_pastur_matches_simulation() -> None:
    p, N = 40, 160
    rng = np.random.default_rng(0)
    sims = np.stack(
        [
            np.sort(np.linalg.eigvalsh(X @ X.T / N))[::-1]
            for X in (rng.standard_normal((p, N)) for _ in range(200))
        ]
    )
    mp = marchenko_pastur_quantiles(p, N)
    assert np.abs(sims.mean(axis=0) - mp)[2:-2].max() < 0.08  # bulk; edges fluctuate (Tracy-Widom)
    assert mp[0] <= (1 + np.sqrt(p / N)) ** 2 and mp[-1] >= (1 - np.sqrt(p / N)) ** 2


@pytest.mark.parametrize("space", ["raw", "circuit"])
def test_spectrum_nulls(space: str) -> None:
    model = make_model("mha", n_layers=3, dtype=torch.float64)
    rep = "qk" if space == "raw" else "qk-circuit"
    df = qs.decomposition.nulls.spectrum_nulls(model, rep, n_seeds=3, seed=0)
    curves = set(df["curve"])
    assert {"real", "shuffled", "gaussian", "random_subspace"} <= curves
    assert ("marchenko_pastur" in curves) == (space == "raw")
    for _, grp in df.groupby("curve"):
        v = grp["cumulative_variance"].to_numpy()
        assert np.all(np.diff(v) >= -1e-12) and abs(v[-1] - 1) < 1e-9
    rnd = df[df.curve == "random_subspace"]["cumulative_variance"].to_numpy()
    np.testing.assert_allclose(rnd[:11], np.arange(1, 12) / 11)
    # the Gaussian null of Gaussian heads is close to MP (same shape of curve)
    mp = df[df.curve == "marchenko_pastur"]["cumulative_variance"].to_numpy() if space == "raw" else None
    if mp is not None:
        g = df[df.curve == "gaussian"]["cumulative_variance"].to_numpy()[: len(mp)]
        assert np.abs(g - mp).max() < 0.1


def test_baselines_figure_builds() -> None:
    model = make_model("mha")
    nulls = qs.decomposition.nulls.spectrum_nulls(model, "qk", n_seeds=2)
    fig = qs.viz.nulls.baselines_figure(nulls)
    assert len(fig.data) == 5  # real, shuffled, gaussian, random subspace, Marchenko-Pastur
