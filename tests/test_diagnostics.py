"""Attention-pattern diagnostics: exact values, streaming = full cache, restore guarantees."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import entropy as scipy_entropy
from transformer_lens import head_detector

import qk_subspace as qs
import qk_subspace.evaluation.diagnostics as diag_mod
from qk_subspace.evaluation.diagnostics import DIVERGENCE_COLUMNS, HEAD_SCORE_NAMES, attention_diagnostics
from tests.conftest import assert_params_equal, make_model, param_snapshot, tolerance


def _toks(n: int = 3, pos: int = 16, seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _no_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())


# ------------------------------------------------------------------------- identity edits
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_identity_target_and_k_all_give_zero_divergence(kind: str) -> None:
    model = make_model(kind)  # float32, non-zero biases
    toks = _toks()
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)
    for target in (W, pca.reconstruct(pca.n_heads_)):
        df = attention_diagnostics(model, toks, target)
        assert len(df) == model.cfg.n_layers * model.cfg.n_heads
        for col in ("kl", "js", "tv"):
            assert df[col].abs().max() < 1e-6, (col, df[col].max())
        assert (df["top1_agreement"] == 1.0).all()
        np.testing.assert_allclose(df["entropy_orig"], df["entropy_edited"], atol=1e-5)
        for name in HEAD_SCORE_NAMES:
            np.testing.assert_allclose(df[f"{name}_orig"], df[f"{name}_edited"], atol=1e-6)
        assert df["residual"].max() < 1e-5


# ----------------------------------------------------------------- analytic uniform head
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_constant_scores_head_is_uniform_with_analytic_kl(kind: str) -> None:
    """W_Q = 0 (pinv injection of a zero W_QK) and b_Q = 0 make q = 0, so every score is 0 and
    the head attends uniformly over the causal prefix: KL(p || u_i) = log(i + 1) - H(p_i)."""
    model = make_model(kind, dtype=torch.float64)
    L, H, pos = 1, 2, 12
    toks = _toks(3, pos)
    cfg = model.cfg
    b_Q = model.blocks[L].attn.b_Q.detach().clone()
    b_Q[H] = 0.0
    target = torch.zeros(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, dtype=torch.float64)
    snap = param_snapshot(model)
    with qs.ParameterEdit(model, {f"blocks.{L}.attn.b_Q": b_Q}):
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
        p = cache["pattern", L][:, H]  # [b, q, k] original
        with torch.no_grad(), qs.inject_qk(model, target, heads=[(L, H)], method="pinv"):
            _, cache_e = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
        n = torch.arange(1, pos + 1, dtype=torch.float64)
        uniform = torch.tril(torch.ones(pos, pos, dtype=torch.float64)) / n[:, None]
        torch.testing.assert_close(
            cache_e["pattern", L][:, H],
            uniform.expand(3, pos, pos),
            atol=tolerance(model, 1e-15, 1e-7),
            rtol=0,
        )

        df = attention_diagnostics(model, toks, target, heads=[(L, H)], method="pinv").set_index("label")
    assert_params_equal(model, snap)

    # independent analytic values, float64
    H_p = -(torch.special.xlogy(p, p)).sum(-1)  # [b, q]
    log_n = torch.log(n)[None, :]
    kl = (log_n - H_p).mean()
    tv = (0.5 * (p - uniform).abs().sum(-1)).mean()
    m = 0.5 * (p + uniform)
    js = 0.5 * (
        torch.special.xlogy(p, p / m).nan_to_num(0).sum(-1)
        + (uniform * torch.log(uniform / m)).nan_to_num(0).sum(-1)
    )
    row = df.loc[f"L{L}H{H}"]
    assert row["edited"]
    tol = tolerance(model, 1e-12, 1e-7)
    assert abs(row["kl"] - float(kl)) < tol
    assert abs(row["tv"] - float(tv)) < tol
    assert abs(row["js"] - float(js.mean())) < tol
    assert abs(row["entropy_edited"] - float(log_n.mean())) < tol
    assert abs(row["entropy_orig"] - float(H_p.mean())) < tol
    assert abs(row["first_token_mass_edited"] - float((1 / n).mean())) < tol
    assert row["residual"] == 0.0  # pinv of a zero target writes W_Q = 0 exactly
    # every other head of layers <= L sees the same residual stream: exactly unchanged
    others = df[(df["layer"] <= L) & ~((df["layer"] == L) & (df["head"] == H))]
    assert (others["kl"] == 0).all() and (others["tv"] == 0).all()
    assert not others["edited"].any()


# ------------------------------------------------------- batch size / streaming / full cache
def _reference_from_full_caches(model, toks, target) -> pd.DataFrame:
    """Independent computation: two full activation caches, scipy divergences per row,
    TransformerLens' own head-detector functions per sequence."""
    cfg = model.cfg
    filt = lambda n: n.endswith("hook_pattern")
    _, c_o = model.run_with_cache(toks, names_filter=filt)
    with qs.inject_qk(model, target):
        _, c_e = model.run_with_cache(toks, names_filter=filt)
    rep = qs.evaluation.diagnostics.repeated_random_tokens(model)
    _, r_o = model.run_with_cache(rep, names_filter=filt)
    with qs.inject_qk(model, target):
        _, r_e = model.run_with_cache(rep, names_filter=filt)
    rows = []
    pos = toks.shape[1]
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            acc: dict[str, list[float]] = {c: [] for c in DIVERGENCE_COLUMNS}
            for b in range(toks.shape[0]):
                for i in range(pos):
                    p = c_o["pattern", layer][b, h, i, : i + 1].double().numpy()
                    r = c_e["pattern", layer][b, h, i, : i + 1].double().numpy()
                    acc["kl"].append(rel_entr(p, r).sum())
                    acc["js"].append(jensenshannon(p, r) ** 2 if i else 0.0)
                    acc["tv"].append(0.5 * np.abs(p - r).sum())
                    acc["entropy_orig"].append(scipy_entropy(p))
                    acc["entropy_edited"].append(scipy_entropy(r))
                    acc["top1_agreement"].append(float(p.argmax() == r.argmax()))
                    acc["first_token_mass_orig"].append(p[0])
                    acc["first_token_mass_edited"].append(r[0])
                    acc["kl_floored"].append(float(((p > 0) & (r == 0)).any()))
            row = {"layer": layer, "head": h, **{c: float(np.mean(v)) for c, v in acc.items()}}
            for name in HEAD_SCORE_NAMES:
                for which, cache in (("orig", r_o), ("edited", r_e)):
                    scores = []
                    for b in range(rep.shape[0]):
                        det = getattr(head_detector, f"get_{name}_head_detection_pattern")(rep[b : b + 1])
                        scores.append(
                            head_detector.compute_head_attention_similarity_score(
                                cache["pattern", layer][b, h].double(),
                                det.double(),
                                exclude_bos=False,
                                exclude_current_token=False,
                                error_measure="mul",
                            )
                        )
                    row[f"{name}_{which}"] = float(np.mean(scores))
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_streaming_equals_full_cache_reference(kind: str) -> None:
    model = make_model(kind, dtype=torch.float64)
    toks = _toks(3, 10)
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    target = pca.reconstruct(1)
    df = attention_diagnostics(model, toks, target, batch_size=2)
    ref = _reference_from_full_caches(model, toks, target)
    assert df["kl"].max() > 1e-3  # a real edit, not a trivial comparison
    cols = list(DIVERGENCE_COLUMNS) + [f"{n}_{w}" for n in HEAD_SCORE_NAMES for w in ("orig", "edited")]
    for c in cols:
        np.testing.assert_allclose(
            df[c].to_numpy(), ref[c].to_numpy(), rtol=tolerance(model, 1e-9), atol=1e-12, err_msg=c
        )


def test_metrics_invariant_to_batch_size() -> None:
    model = make_model("mha", dtype=torch.float64)
    toks = _toks(4, 12)
    target = qs.HeadPCA().fit(qs.qk_matrices(model)).reconstruct(2)
    rep = qs.evaluation.diagnostics.repeated_random_tokens(model, n_seqs=4, half_len=6)
    dfs = [attention_diagnostics(model, toks, target, rep_tokens=rep, batch_size=bs) for bs in (1, 3, 4)]
    num = dfs[0].select_dtypes("number").columns
    for other in dfs[1:]:
        np.testing.assert_allclose(other[num].to_numpy(), dfs[0][num].to_numpy(), rtol=1e-11, atol=1e-14)


def test_inside_an_edit_equals_target_mode_and_leaves_the_edit_alone() -> None:
    model = make_model("gqa", dtype=torch.float64)
    toks = _toks(2, 10)
    target = qs.HeadPCA().fit(qs.qk_matrices(model)).reconstruct(1)
    df_t = attention_diagnostics(model, toks, target)
    snap = param_snapshot(model)
    with qs.inject_qk(model, target) as edit:
        inside = param_snapshot(model)
        df_i = attention_diagnostics(model, toks)
        assert_params_equal(model, inside)
        assert qs.active_edits(model) == [edit]
    assert_params_equal(model, snap)
    assert df_i.attrs["mode"] == "inside" and df_t.attrs["mode"] == "target"
    num = df_t.select_dtypes("number").columns
    np.testing.assert_allclose(df_i[num].to_numpy(), df_t[num].to_numpy(), rtol=0, atol=0)
    assert (df_i["edited"] == df_t["edited"]).all()


# ------------------------------------------------------------------- restore guarantees
def test_hooks_removed_and_weights_restored_also_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("mha")
    toks = _toks()
    target = qs.HeadPCA().fit(qs.qk_matrices(model)).reconstruct(1)
    snap = param_snapshot(model)
    attention_diagnostics(model, toks, target)
    assert_params_equal(model, snap)
    assert _no_hooks(model) and not qs.active_edits(model)

    calls = {"n": 0}
    real = diag_mod._row_stats

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # fail mid-stream, inside the hook of layer 0
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(diag_mod, "_row_stats", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        attention_diagnostics(model, toks, target)
    assert_params_equal(model, snap)
    assert _no_hooks(model) and not qs.active_edits(model)

    calls["n"] = 0
    with qs.inject_qk(model, target) as edit:
        edited = param_snapshot(model)
        with pytest.raises(RuntimeError, match="boom"):
            attention_diagnostics(model, toks)
        assert_params_equal(model, edited)
        assert qs.active_edits(model) == [edit] and _no_hooks(model)
    assert_params_equal(model, snap)


def test_validation_errors() -> None:
    model = make_model("mha")
    toks = _toks()
    with pytest.raises(ValueError, match="no qk_subspace edit is active"):
        attention_diagnostics(model, toks)
    W = qs.qk_matrices(model)
    with qs.inject_qk(model, W), pytest.raises(ValueError, match="heads"):
        attention_diagnostics(model, toks, heads=[0])
    with pytest.raises(ValueError, match="out of range"):
        attention_diagnostics(model, toks, W, heads=[(5, 0)])
    with pytest.raises(ValueError, match="batch_size"):
        attention_diagnostics(model, toks, W, batch_size=0)
    with pytest.raises(ValueError, match="n_ctx"):
        attention_diagnostics(model, _toks(1, 40), W)


def test_head_type_scores_match_transformer_lens_on_handmade_patterns() -> None:
    toks = torch.tensor([[3, 5, 7, 3, 5, 7, 3]])
    g = torch.Generator().manual_seed(0)
    pat = torch.rand(1, 2, 7, 7, generator=g, dtype=torch.float64).tril()
    pat = pat / pat.sum(-1, keepdim=True)
    ours = qs.evaluation.diagnostics.head_type_scores(pat, toks)
    for name in HEAD_SCORE_NAMES:
        det = getattr(head_detector, f"get_{name}_head_detection_pattern")(toks)
        for h in range(2):
            ref = head_detector.compute_head_attention_similarity_score(
                pat[0, h], det.double(), exclude_bos=False, exclude_current_token=False, error_measure="mul"
            )
            assert abs(float(ours[name][0, h]) - ref) < 1e-12, name
    # a pure previous-token pattern scores 1
    prev = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    prev[0, 0, 0, 0] = 1
    prev[0, 0, torch.arange(1, 7), torch.arange(0, 6)] = 1
    assert (
        abs(float(qs.evaluation.diagnostics.head_type_scores(prev, toks)["previous_token"][0, 0]) - 6 / 7)
        < 1e-12
    )


def test_repeated_random_tokens_and_diagnostic_batch() -> None:
    model = make_model("mha")
    rep = qs.evaluation.diagnostics.repeated_random_tokens(model, n_seqs=3, half_len=5, seed=1)
    bos = model.tokenizer is not None  # [BOS] R R when the model has a tokenizer with a BOS token
    assert rep.shape == (3, 10 + bos)
    if bos:
        assert (rep[:, 0] == model.tokenizer.bos_token_id).all()
        rep = rep[:, 1:]
    assert torch.equal(rep[:, :5], rep[:, 5:])
    stream = torch.arange(100)
    b = qs.evaluation.diagnostics.diagnostic_batch(stream, n_seqs=2, ctx=8, skip_tokens=50)
    assert torch.equal(b, torch.arange(50, 66).reshape(2, 8))
    with pytest.raises(ValueError, match="need 16 tokens"):
        qs.evaluation.diagnostics.diagnostic_batch(stream, n_seqs=2, ctx=8, skip_tokens=90)


# ------------------------------------------------------------------------ sweeps / output
def test_diagnostics_sweep_breaking_heads_and_json() -> None:
    model = make_model("mha")
    toks = _toks(2, 12)
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    long = qs.evaluation.diagnostics.diagnostics_sweep(model, pca, toks, [0, 2, pca.n_heads_], progress=False)
    assert list(long["K"].unique()) == [0, 2, pca.n_heads_]
    assert long[long["K"] == pca.n_heads_]["kl"].max() < 1e-6
    recs = qs.evaluation.diagnostics.diagnostics_to_records(long)
    assert json.loads(json.dumps(recs, allow_nan=False)) == recs
    thr = float(long[long["K"] == 2]["kl"].max()) / 2
    table = qs.evaluation.diagnostics.breaking_heads(long, threshold=thr, top=3)
    assert table.attrs["K_break"] == 2 and (table["K"] == 2).all()
    assert 1 <= len(table) <= 3 and table["kl"].is_monotonic_decreasing and (table["kl"] > thr).all()
    assert qs.evaluation.diagnostics.breaking_heads(long, threshold=1e9).empty


def test_sweep_k_with_diagnostics() -> None:
    model = make_model("gqa")
    toks = _toks(2, 16)
    diag_toks = _toks(2, 8, seed=5)
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    seen = []
    df = qs.sweep_k(
        model,
        pca,
        toks,
        [1, pca.n_heads_],
        progress=False,
        n_boot=50,
        diagnostics=True,
        diag_tokens=diag_toks,
        diagnostics_options={"head_scores": False},
        on_row=seen.append,
    )
    recs = df.attrs["attention_diagnostics"]
    assert len(recs) == 2 * model.cfg.n_layers * model.cfg.n_heads
    assert {r["K"] for r in recs} == {1, pca.n_heads_}
    assert df["diag_max_kl"].iloc[-1] < 1e-6 and df["diag_max_kl"].iloc[0] > 1e-4
    assert len(seen[0]["attention_diagnostics"]) == model.cfg.n_layers * model.cfg.n_heads
    assert "attention_diagnostics" not in df.columns
    direct = attention_diagnostics(model, diag_toks, pca.reconstruct(1), head_scores=False)
    np.testing.assert_allclose(
        pd.DataFrame(recs).query("K == 1")["kl"].to_numpy(), direct["kl"].to_numpy(), atol=1e-9
    )
    with pytest.raises(ValueError, match="diag_tokens"):
        qs.sweep_k(model, pca, toks, [1], progress=False, diagnostics=True)


def test_plots(tmp_path) -> None:
    from qk_subspace.viz import diagnostics as plots
    from qk_subspace.viz import save_figure

    model = make_model("mha")
    toks = _toks(2, 10)
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    long = qs.evaluation.diagnostics.diagnostics_sweep(
        model, pca, toks, [0, 1, pca.n_heads_], progress=False, head_scores=False
    )
    fig = plots.plot_head_metric_heatmap(long, "kl")
    assert len(fig.data) == 3 and [a.text for a in fig.layout.annotations] == [
        "K=8",
        "K=1",
        "K=0",
    ]  # one panel per K
    assert fig.data[0].z.shape == (model.cfg.n_layers, model.cfg.n_heads)
    fig2 = plots.plot_layer_metric_vs_k(long)
    assert len(fig2.data) == model.cfg.n_layers
    pairs = qs.head_patterns(model, toks[0], [(1, 0), (0, 3)], pca.reconstruct(0))
    assert set(pairs) == {(1, 0), (0, 3)} and pairs[(1, 0)][0].shape == (10, 10)
    fig3 = plots.plot_pattern_comparison(pairs, [f"t{i}" for i in range(10)])
    assert len(fig3.data) == 4 and list(fig3.layout.xaxis.ticktext) == [f"t{i}" for i in range(10)]
    fig4 = plots.plot_breaking_heads_table(qs.evaluation.diagnostics.breaking_heads(long, threshold=0.0))
    assert fig4.data[0].type == "table"
    written = save_figure(fig3, tmp_path, "cmp", png=False)
    assert (tmp_path / "cmp.html").is_file() and "html" in written


def test_head_patterns_match_run_with_cache() -> None:
    model = make_model("gqa", dtype=torch.float64)
    toks = _toks(1, 9)
    target = qs.HeadPCA().fit(qs.qk_matrices(model)).reconstruct(0)
    pairs = qs.head_patterns(model, toks, [5], target)
    _, c_o = model.run_with_cache(toks)
    with qs.inject_qk(model, target):
        _, c_e = model.run_with_cache(toks)
    np.testing.assert_array_equal(pairs[(1, 1)][0], c_o["pattern", 1][0, 1].numpy())
    np.testing.assert_array_equal(pairs[(1, 1)][1], c_e["pattern", 1][0, 1].numpy())


@pytest.mark.skipif(
    importlib.util.find_spec("circuitsvis") is None, reason="circuitsvis (extra 'viz') not installed"
)
def test_show_patterns_circuitsvis() -> None:
    model = make_model("mha")
    toks = _toks(1, 6)
    pairs = qs.head_patterns(model, toks, [(0, 1)], qs.qk_matrices(model))
    out = qs.evaluation.diagnostics.show_patterns(pairs, [f"t{i}" for i in range(6)])
    assert "L0H1 edited" in str(out)


def test_stories260k_k_all_is_exact(stories260k: tuple[Path, Path]) -> None:
    STORIES, TINYSTORIES = stories260k
    model = qs.load_model(STORIES)
    text = TINYSTORIES.read_text()[:3000]
    toks = model.tokenizer(text, return_tensors="pt").input_ids[:, :64].reshape(2, 32)
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    df = attention_diagnostics(model, toks, pca.reconstruct(pca.n_heads_), head_scores=False)
    assert df["kl"].max() < 1e-6 and (df["top1_agreement"] == 1).all()
    df0 = attention_diagnostics(model, toks, pca.reconstruct(1), head_scores=False)
    assert df0["kl"].max() > 1e-3
