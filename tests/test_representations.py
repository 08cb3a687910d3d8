"""The central abstractions: mixing matrices, the representation protocol and registry, the one edit
residual, the sweep engine, and the config that generates the CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.decomposition.plans import Plan, cluster_plans, topk_plans
from qk_subspace.evaluation.sweep import run_sweep
from qk_subspace.experiment.config import GROUPS, ExperimentConfig, fields_of, flag_name
from qk_subspace.representations import (
    DenseMixing,
    FeatureProjection,
    Replacement,
    Restricted,
)
from tests.conftest import assert_params_equal, make_model, param_snapshot

REPS = ("qk", "qk-canonical", "qk-circuit", "ov")


# ----------------------------------------------------------------------------- mixings
def test_mixing_types_apply_their_matrix() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 7))
    A = rng.standard_normal((5, 5))
    np.testing.assert_allclose(DenseMixing(A).apply(X), A @ X)
    exact = DenseMixing(A, exact=(X, lambda: X * 0 + 1))
    assert (exact.apply(X) == 1).all() and np.allclose(exact.apply(X.copy()), A @ X)  # only for that array
    src = np.array([0, 0, 2, 2, 4])
    rep = Replacement(src)
    np.testing.assert_array_equal(rep.apply(X), rep.matrix() @ X)
    assert rep.edited.tolist() == [False, True, False, True, False] and not rep.is_identity
    assert Replacement(np.arange(5)).is_identity and DenseMixing(np.eye(5)).is_identity
    mask = np.array([True, False, True, False, False])
    r = Restricted(DenseMixing(A), mask)
    np.testing.assert_allclose(r.apply(X), r.matrix() @ X)
    np.testing.assert_array_equal(r.apply(X)[~mask], X[~mask])
    assert r.edited.tolist() == mask.tolist()
    Q, _ = np.linalg.qr(rng.standard_normal((7, 3)))
    fp = FeatureProjection(5, Q)
    mean = X.mean(0)
    np.testing.assert_allclose(fp.apply(X), mean + (X - mean) @ Q @ Q.T)
    with pytest.raises(TypeError, match="not a mixing of heads"):
        fp.matrix()
    with pytest.raises(ValueError, match="square"):
        DenseMixing(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="source"):
        Replacement(np.array([0, 5]))


def test_pca_mixings_are_reconstructions_and_k_all_is_identity() -> None:
    W = qs.qk_matrices(make_model("mha", n_layers=3, dtype=torch.float64))
    for pca in (qs.HeadPCA().fit(W), qs.HeadPCA(engine="gram").fit(W), qs.HeadPCA(groupby="layer").fit(W)):
        X = pca.heads_.features
        for K in (0, 1, 2):
            m = pca.mixing(K=K)
            assert not m.is_identity
            np.testing.assert_allclose(m.apply(X), m.matrix() @ X, atol=1e-10)  # factored = A X
            A = m.matrix()
            np.testing.assert_allclose(A @ A, A, atol=1e-10)  # a projection (plus the mean)
        assert pca.mixing(K=pca.max_k_).is_identity
        assert pca.mixing(K=pca.n_nonzero_components_).is_identity


# ------------------------------------------------------------------- the registry
def test_registry_names_and_supports() -> None:
    assert qs.representations.names() == list(REPS)
    assert qs.representations.get("qk-circuit").gauge_invariant
    assert not qs.representations.get("qk").gauge_invariant
    assert qs.representations.for_circuit_and_space("qk", "canonical").name == "qk-canonical"
    assert qs.representations.get("ov").supported("importance")
    assert not qs.representations.get("qk-circuit").supported("diagnostics")
    with pytest.raises(ValueError, match="unknown representation"):
        qs.representations.get("vo")
    with pytest.raises(ValueError, match="unknown option"):
        qs.representations.get("qk").supported("colour")
    with pytest.raises(ValueError, match="no representation"):
        qs.representations.for_circuit_and_space("ov", "circuit")


def test_a_new_representation_is_one_class_and_one_register_call(tokens: torch.Tensor) -> None:
    class Transposed(qs.representations.HeadSpaceRepresentation):
        """W_K^T W_Q: the QK matrix transposed, realised through W_Q by transposing the target back."""

        name, circuit, space = "qk-transposed", "qk", "transposed"
        description = "W_K^T W_Q per head"
        supports = frozenset({"clustering"})

        def matrices(self, model):  # type: ignore[no-untyped-def]
            return qs.qk_matrices(model).transpose(-1, -2)

        def edit(self, model, heads, mixing, **options):  # type: ignore[no-untyped-def]
            target = heads.materialize(mixing).transpose(-1, -2).contiguous()
            return qs.inject_qk(model, target, heads=self._head_mask(heads, mixing), **options)

    qs.representations.register(Transposed())
    try:
        model = make_model("mha")
        rep = qs.representations.get("qk-transposed")
        pca = qs.HeadPCA().fit(rep.heads(model))
        df = run_sweep(model, tokens, rep, pca.heads_, topk_plans(pca, [0, 8]), progress=False, n_boot=20)
        assert df.attrs["k_all_ok"] and df["ratio"].iloc[0] > df["ratio"].iloc[1]
    finally:
        del qs.representations.REGISTRY["qk-transposed"]


# ------------------------------------------------------------ one edit, one residual
@pytest.mark.parametrize("name", REPS)
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_every_representation_at_k_all_reproduces_the_baseline(
    name: str, kind: str, tokens: torch.Tensor
) -> None:
    model = make_model(kind, dtype=torch.float32)
    snap = param_snapshot(model)
    rep = qs.representations.get(name)
    with rep.context(model):
        heads = rep.heads(model)
        pca = qs.HeadPCA().fit(heads)
        plans = topk_plans(pca, [2, pca.max_k_], columns="space", space=rep.space)
        df = run_sweep(model, tokens, rep, heads, plans, progress=False, n_boot=20)
    assert df.attrs["k_all_ok"] and abs(df.attrs["k_all_ratio"] - 1) < 1e-5
    assert list(df["is_all"]) == [False, True]
    assert_params_equal(model, snap)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_residual_is_the_relative_frobenius_error_of_the_realised_target(kind: str) -> None:
    model = make_model(kind, dtype=torch.float32)
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    for inject, read in ((qs.inject_qk, qs.qk_matrices), (qs.inject_ov, qs.ov_matrices)):
        target = read(model) + 0.1 * torch.randn(
            cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, generator=g, dtype=torch.float64
        )
        with inject(model, target) as edit:
            diff = read(model) - target  # the realised circuits, read independently
            rel = diff.flatten(2).norm(dim=-1) / target.flatten(2).norm(dim=-1)
            torch.testing.assert_close(edit.residual, rel, rtol=1e-6, atol=1e-12)
            total = float(diff.norm() / target.norm())
            assert edit.residual_total == pytest.approx(total, rel=1e-6)
            torch.testing.assert_close(
                edit.max_abs_error, diff.abs().amax(dim=(-1, -2)), rtol=1e-6, atol=1e-12
            )


def test_circuit_residual_is_the_part_outside_the_key_span() -> None:
    model = make_model("gqa", dtype=torch.float64)
    rep = qs.representations.get("qk-circuit")
    heads = rep.heads(model)
    pca = qs.HeadPCA().fit(heads)
    target = heads.materialize(pca.mixing(K=1))
    with rep.edit(model, heads, pca.mixing(K=1)) as edit:
        realised = rep.heads(model).materialize(qs.representations.DenseMixing(np.eye(pca.n_heads_)))
    rel = (realised - target).flatten(2).norm(dim=-1) / target.flatten(2).norm(dim=-1)
    torch.testing.assert_close(edit.residual, rel, rtol=1e-6, atol=1e-9)
    assert edit.max_abs_error is None and edit.residual.max() > 1e-3


# --------------------------------------------------------------------- the engine
def test_engine_rows_order_and_inside(tokens: torch.Tensor) -> None:
    model = make_model("mha")
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    seen: list[dict] = []
    plans = [Plan("id", qs.representations.DenseMixing(np.eye(8)), {"name": "identity"}, {"tail": 1})]
    plans += cluster_plans(pca, [2], n_dims=3)
    df = run_sweep(
        model, tokens, "qk", pca.heads_, plans, progress=False, n_boot=20, on_row=seen.append,
        inside=lambda m, plan: {"label": plan.label, "n_active": len(qs.active_edits(m))},
    )  # fmt: skip
    assert list(seen[0]) == [
        "name",
        "ppl",
        "mean_nll",
        "ratio",
        "ratio_low",
        "ratio_high",
        "max_residual",
        "tail",
        "label",
        "n_active",
    ]
    assert seen[0]["n_active"] == 1 and seen[1]["label"] == "k=2" and seen[1]["replaced"] == 6
    assert df.attrs["k_all_ok"] and df.attrs["k_all_ratio"] == seen[0]["ratio"]
    only_inside = run_sweep(
        model, None, "qk", pca.heads_, plans[:1], progress=False, inside=lambda m, p: {"x": 1}
    )
    assert list(only_inside.columns) == ["name", "max_residual", "tail", "x"]
    assert "baseline_ppl" not in only_inside.attrs


# ----------------------------------------------------------- config and the CLI
def test_config_options_by_name_and_errors_name_the_flag() -> None:
    cfg = ExperimentConfig().replace(n_tokens=4096, ks=[1, 3], space="circuit")
    assert cfg.text.n_tokens == 4096 and cfg.sweeps.ks == (1, 3) and cfg.representation == "qk-circuit"
    assert cfg.value("gate_k") == 10 and ExperimentConfig().replace(gate_k=3).sweeps.gate_k == 3
    with pytest.raises(TypeError, match="unknown option 'n_tokns'"):
        ExperimentConfig().replace(n_tokns=1)
    for name, bad, words in (
        ("n_dims", 0, ["n_dims", "--n-dims", ">= 1"]),
        ("batch_size", 2.5, ["--batch-size", "integer"]),
        ("dtype", "float8", ["--dtype", "float32"]),
        ("gate_threshold", -1.0, ["--gate-threshold", "> 0"]),
        ("cluster_ks", (4, 0), ["--cluster-ks", ">= 1"]),
        ("png", "yes", ["--no-png", "True or False"]),
    ):
        with pytest.raises(ValueError) as info:
            ExperimentConfig().replace(**{name: bad})
        assert all(w in str(info.value) for w in words), (name, str(info.value))
    with pytest.raises(ValueError, match="--groupby layer cannot be combined with --circuit ov"):
        ExperimentConfig().replace(circuit="ov", groupby="layer")
    assert flag_name("head_scores") == "--no-head-scores" and flag_name("diagnostics") == "--diagnostics"


def test_every_config_field_is_a_cli_option_with_help_and_default() -> None:
    from qk_subspace.cli import build_parser

    run = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
    )
    by_dest = {a.dest: a for a in run._actions}
    for cls in GROUPS.values():
        for f, opt in fields_of(cls):
            action = by_dest[f.name]
            assert opt.flag_for(f.name, f.default) in action.option_strings
            assert action.help and len(action.help) > 10, f.name
            if opt.kind != "bool":
                assert "default" in action.help, f.name
    assert isinstance(run, argparse.ArgumentParser)
