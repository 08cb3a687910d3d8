"""Component and head importance: drop-one, gradient (checked by finite differences), ordered sweeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import qk_subspace as qs
from qk_subspace.evaluation.importance import _loss_per_chunk
from tests.conftest import assert_params_equal, float32_attention, make_model, param_snapshot


def inject(circuit: str):  # type: ignore[no-untyped-def]
    """The exact injection of a head-space circuit: through W_Q ("qk") or W_V ("ov")."""
    return qs.inject_qk if circuit == "qk" else qs.inject_ov


def _toks(n: int = 4, ctx: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (n, ctx), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("circuit", ["qk", "ov"])
def test_drop_none_reproduces_baseline_and_zero_variance_drop_is_free(circuit: str) -> None:
    model = make_model("gqa")
    toks = _toks()
    pca = qs.HeadPCA().fit(qs.representations.get(circuit).matrices(model))
    assert pca.n_heads_ == 8 and pca.n_nonzero_components_ == 7  # component 7 has zero variance
    base = qs.perplexity(model, toks, progress=False)
    with inject(circuit)(model, pca.reconstruct(components=list(range(pca.n_components_)))):
        kept_all = qs.perplexity(model, toks, progress=False)
    assert abs(kept_all.ppl / base.ppl - 1) < 1e-5
    df = qs.component_importance(
        model,
        pca,
        toks,
        "drop_one",
        components=[7, 2],
        representation=circuit,
        baseline=base,
        progress=False,
        n_boot=200,
    )
    assert list(df["component"]) == [7, 2] and df.attrs["score"] == "delta_nll"
    zero, real = df.iloc[0], df.iloc[1]
    assert abs(zero["delta_nll"]) < 1e-6 and abs(zero["ratio"] - 1) < 1e-5
    assert abs(real["delta_nll"]) > 1e-4
    assert real["ratio_low"] <= real["ratio"] <= real["ratio_high"]


def test_drop_one_row_matches_independent_edit() -> None:
    model = make_model("mha")
    toks = _toks()
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)
    df = qs.component_importance(model, pca, toks, components=[1], progress=False, n_boot=100)
    # independent: subtract c_h1 * V_1 from every head directly
    V = torch.from_numpy(pca.components_[1]).reshape(8, 8)
    c = torch.from_numpy(pca.transform(W)[:, 1]).reshape(2, 4, 1, 1)
    with qs.inject_qk(model, W - c * V):
        direct = qs.perplexity(model, toks, progress=False)
    assert abs(df["ppl"].iloc[0] - direct.ppl) < 1e-6 * direct.ppl
    assert df.attrs["n_tokens"] == 4 * 15 and df.attrs["baseline_ppl"] > 0


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("circuit", ["qk", "ov"])
def test_circuit_gradient_matches_finite_differences(kind: str, circuit: str) -> None:
    model = make_model(kind, dtype=torch.float64)
    toks = _toks(3, 12, seed=1)
    snap = param_snapshot(model)
    G = qs.evaluation.importance.circuit_gradient(model, toks, circuit, progress=False)
    assert G.shape == (2, 4, 8, 8) and G.dtype == torch.float64
    T = qs.representations.get(circuit).matrices(model)

    def loss(target: torch.Tensor) -> float:
        with torch.no_grad(), inject(circuit)(model, target):
            return float(_loss_per_chunk(model, toks).mean())

    g = torch.Generator().manual_seed(7)
    # a model with float32 attention gets a wider step and tolerance (its loss has float32 round-off)
    eps, tol = (1e-3, 2e-3) if float32_attention(model) else (1e-5, 1e-6)
    for _ in range(3):
        E = torch.randn(T.shape, generator=g, dtype=torch.float64)  # not symmetric: transposes matter
        fd = (loss(T + eps * E) - loss(T - eps * E)) / (2 * eps)
        assert abs(fd - float((G * E).sum())) < tol * max(1.0, abs(fd))
    # single entries, one of them off-diagonal both ways round
    for idx in [(0, 1, 2, 5), (0, 1, 5, 2), (1, 3, 0, 0)]:
        E = torch.zeros_like(T)
        E[idx] = 1.0
        fd = (loss(T + eps * E) - loss(T - eps * E)) / (2 * eps)
        assert abs(fd - float(G[idx])) < tol * max(1.0, abs(fd))
    assert_params_equal(model, snap)


def test_gradient_scores_and_flags_restored() -> None:
    model = make_model("gqa", dtype=torch.float64)
    toks = _toks(3, 12, seed=2)
    names = [n for n, _ in model.named_parameters()]
    wq = qs.model.weights.weight_slots(model)["blocks.1.attn.W_Q"].parameter  # its parameter on a bridge
    frozen = {names[0], next(n for n, p in model.named_parameters() if p is wq)}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    snap = param_snapshot(model)
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)
    df = qs.component_importance(model, pca, toks, "gradient", progress=False)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert all(p.grad is None for p in model.parameters())
    assert_params_equal(model, snap)
    assert list(df["component"]) == list(range(7)) and df.attrs["score"] == "fisher"
    # independent: per-chunk gradients from circuit_gradient on one chunk at a time
    V = torch.from_numpy(pca.components_[:7])
    C = torch.from_numpy(pca.coefficients_[:, :7])
    per_chunk = []
    for i in range(3):
        Gi = qs.evaluation.importance.circuit_gradient(model, toks[i : i + 1], "qk", progress=False).reshape(
            8, 64
        )
        per_chunk.append(-(C * (Gi @ V.T)).sum(0))
    S = torch.stack(per_chunk).numpy()
    np.testing.assert_allclose(df["taylor"], S.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(df["fisher"], 0.5 * (S**2).mean(0), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(df["taylor_fisher"], df["taylor"] + df["fisher"])
    # the first-order estimate agrees with drop-one for a tiny removal (scale the component down)
    j = 0
    G = qs.evaluation.importance.circuit_gradient(model, toks, "qk", progress=False)
    Vj = V[j].reshape(8, 8)
    cj = C[:, j].reshape(2, 4, 1, 1)
    t = 1e-4
    with torch.no_grad(), qs.inject_qk(model, W - t * cj * Vj):
        moved = float(_loss_per_chunk(model, toks).mean())
    with torch.no_grad():
        base = float(_loss_per_chunk(model, toks).mean())
    assert abs((moved - base) / t - df["taylor"].iloc[j]) < 1e-3 * max(1.0, abs(df["taylor"].iloc[j]))
    assert abs(float((G * (-cj * Vj)).sum()) - df["taylor"].iloc[j]) < 1e-10


def test_importance_order_and_rank_correlation() -> None:
    df = pd.DataFrame({"component": [0, 1, 2, 3], "delta_nll": [0.1, 0.5, 0.5, -0.2], "x": [1, 2, 3, 4]})
    df.attrs["score"] = "delta_nll"
    assert qs.evaluation.importance.importance_order(df) == [1, 2, 0, 3]  # ties by component index
    assert qs.evaluation.importance.importance_order(df, "x") == [3, 2, 1, 0]
    assert qs.evaluation.importance.importance_order([3, 1]) == [3, 1]
    with pytest.raises(ValueError, match="score"):
        qs.evaluation.importance.importance_order(df, "nope")
    other = pd.DataFrame({"component": [3, 2, 1, 0], "s": [1.0, 2.0, 3.0, 4.0]})  # reversed ranks
    assert qs.evaluation.importance.rank_correlation(df, other, "x", "s")["spearman"] == pytest.approx(-1.0)
    assert qs.evaluation.importance.rank_correlation(df, df, "x", "x")["spearman"] == pytest.approx(1.0)


def test_sweep_k_importance_order() -> None:
    model = make_model("mha")
    toks = _toks()
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    order = [3, 0, 5]
    df = qs.sweep_k(
        model, pca, toks, [0, 1, 2, 8], order="importance", importance=order, progress=False, n_boot=100
    )
    assert df.attrs["order"] == "importance"
    assert df.attrs["component_order"] == [3, 0, 5, 1, 2, 4, 6, 7]  # unranked ones follow by variance
    assert df.attrs["variance_order"] == list(range(8))
    with qs.inject_qk(model, pca.reconstruct(components=[3, 0])):
        direct = qs.perplexity(model, toks, progress=False)
    row = df[df["K"] == 2].iloc[0]
    assert abs(row["ppl"] - direct.ppl) < 1e-9 * direct.ppl
    assert row["cumulative_variance"] == pytest.approx(pca.explained_variance_ratio_[[3, 0]].sum())
    assert df.attrs["k_all_ok"] and bool(df["is_all"].iloc[-1]) and not bool(df["is_all"].iloc[2])
    # K=0 (mean heads) is the same in both orders; variance order keeps its old semantics
    var = qs.sweep_k(model, pca, toks, [0, 2], progress=False, n_boot=100)
    assert var.attrs["order"] == "variance" and var.attrs["component_order"] == list(range(8))
    assert var["ppl"].iloc[0] == pytest.approx(df["ppl"].iloc[0], rel=1e-12)
    with pytest.raises(ValueError, match="importance"):
        qs.sweep_k(model, pca, toks, [1], order="importance", progress=False)
    with pytest.raises(ValueError, match="distinct"):
        qs.sweep_k(model, pca, toks, [1], order="importance", importance=[1, 1], progress=False)
    with pytest.raises(ValueError, match="order"):
        qs.sweep_k(model, pca, toks, [1], order="random", progress=False)
    ov_rank = pd.DataFrame({"component": [0], "delta_nll": [1.0]})
    ov_rank.attrs.update({"score": "delta_nll", "circuit": "ov"})
    with pytest.raises(ValueError, match="circuit"):
        qs.sweep_k(model, pca, toks, [1], order="importance", importance=ov_rank, progress=False)


def test_head_importance_only_and_all_but() -> None:
    model = make_model("gqa")
    toks = _toks()
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    df = qs.evaluation.importance.head_importance(model, pca, toks, K=1, progress=False, n_boot=100)
    assert len(df) == 8 and list(df["label"][:2]) == ["L0H0", "L0H1"]
    with qs.inject_qk(model, pca.reconstruct(1), heads=[(1, 2)]):
        direct = qs.perplexity(model, toks, progress=False)
    assert df[df["label"] == "L1H2"]["ppl"].iloc[0] == pytest.approx(direct.ppl, rel=1e-12)
    M = qs.evaluation.importance.head_importance_matrix(df)
    assert M.shape == (2, 4) and M[1, 2] == df[df["label"] == "L1H2"]["ratio"].iloc[0]
    fig = qs.viz.importance.head_importance_figure(df)
    assert fig.data[0].z.shape == (2, 4)
    ab = qs.evaluation.importance.head_importance(
        model,
        qs.HeadPCA().fit(qs.ov_matrices(model)),
        toks,
        K=1,
        mode="all_but",
        heads=[(0, 0)],
        representation="ov",
        progress=False,
        n_boot=100,
    )
    pca_ov = qs.HeadPCA().fit(qs.ov_matrices(model))
    with qs.inject_ov(model, pca_ov.reconstruct(1), heads=~qs.model.heads.parse_heads([(0, 0)], 2, 4)):
        direct = qs.perplexity(model, toks, progress=False)
    assert len(ab) == 1 and ab["ppl"].iloc[0] == pytest.approx(direct.ppl, rel=1e-12)
    with qs.inject_ov(model, pca_ov.reconstruct(1)):
        all_compressed = qs.perplexity(model, toks, progress=False)
    base = qs.perplexity(model, toks, progress=False)
    assert ab.attrs["ratio_all"] == pytest.approx(all_compressed.ppl / base.ppl, rel=1e-12)
    # K = all: no head costs anything
    full = qs.evaluation.importance.head_importance(
        model, pca, toks, K=pca.n_heads_, progress=False, n_boot=100
    )
    assert np.abs(full["ratio"] - 1).max() < 1e-5 and full["reconstruction_error"].max() < 1e-10


def test_k_reaching_and_overlay_figure() -> None:
    df = pd.DataFrame({"K": [0, 1, 2, 3, 4], "ratio": [5.0, 1.05, 1.2, 1.08, 1.0]})
    assert qs.evaluation.importance.k_reaching(df, 1.1) == {"first": 1, "stays": 3}
    assert qs.evaluation.importance.k_reaching(df, 0.5) == {"first": None, "stays": None}
    for col in ("ratio_low", "ratio_high", "cumulative_variance"):
        df[col] = df["ratio"] if col != "cumulative_variance" else np.linspace(0, 1, 5)
    fig = qs.viz.importance.importance_overlay_figure(df, df, reference_scale=0.5)
    assert len(fig.data) == 4 and fig.data[2].x[-1] == 72 and list(fig.data[3].y) == [1.1, 1.1]


def test_validation_errors() -> None:
    model = make_model("mha")
    toks = _toks()
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    with pytest.raises(ValueError, match="method"):
        qs.component_importance(model, pca, toks, "hessian", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="components"):
        qs.component_importance(model, pca, toks, components=[99], progress=False)
    with pytest.raises(ValueError, match="unknown representation 'vo'"):
        qs.component_importance(model, pca, toks, representation="vo", progress=False)
    other = qs.HeadPCA().fit(qs.qk_matrices(make_model("mha", n_layers=3)))
    with pytest.raises(ValueError, match="fitted on heads"):
        qs.component_importance(model, other, toks, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        qs.component_importance(model, qs.HeadPCA(), toks, progress=False)


def test_gradient_ranks_like_drop_one_on_stories260k(stories260k: tuple[Path, Path]) -> None:
    STORIES, TINYSTORIES = stories260k
    model = qs.load_model(STORIES)
    text = TINYSTORIES.read_text(encoding="utf-8")[:20000]
    toks = qs.chunk_text(model.tokenizer, text, n_tokens=2 * 64, ctx=64)
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    comps = list(range(0, 39, 4))  # 10 components keep this quick
    drop = qs.component_importance(model, pca, toks, "drop_one", components=comps, progress=False, n_boot=100)
    grad = qs.component_importance(model, pca, toks, "gradient", components=comps, progress=False)
    assert qs.evaluation.importance.rank_correlation(drop, grad)["spearman"] > 0.7
