"""Property tests (hypothesis): exact injection and bit-for-bit restore over random architectures
and dtypes, and the optimality / monotonicity of HeadPCA reconstructions.

Tolerances are derived, not tuned: the float64 solve is backward stable, so the residual of
``W_Q_new^T W_K = T`` is at most ``c * eps64 * cond(W_K^T W_K) * (|Delta| + |T|)``; rounding
``W_Q_new`` to float32 adds at most ``eps32 * |W_Q_new| * |W_K|`` (Frobenius norms).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import qk_subspace as qs
from tests.conftest import HOOKED, changed_weights, make_model, param_snapshot
from tests.test_integrity import param_hashes, single_thread  # noqa: F401 - autouse fixture

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def architectures(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["mha", "gqa"]))
    n_heads = draw(st.integers(1, 4))
    d_head = draw(st.sampled_from([2, 4, 6, 8]))  # rotary needs an even d_head
    arch = {
        "kind": kind,
        "n_layers": draw(st.integers(1, 2)),
        "n_heads": n_heads,
        "d_head": d_head,
        # W_K [d_model, d_head] needs d_model >= d_head for full rank; Hugging Face models (the bridge)
        # need d_model to be a multiple of n_heads
        "d_model": draw(
            st.integers(d_head, 20)
            if HOOKED
            else st.sampled_from([m for m in range(d_head, 21) if m % n_heads == 0])
        ),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "seed": draw(st.integers(0, 2**16)),
    }
    if kind == "gqa":
        arch["n_kv_heads"] = draw(st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0]))
    return arch


def _build(arch: dict) -> torch.nn.Module:
    a = dict(arch)
    return make_model(a.pop("kind"), d_vocab=20, n_ctx=8, **a)


def _wk_per_query_head(model, layer: int) -> torch.Tensor:
    """W_K ``[n_heads, d_model, d_head]`` from the raw parameter, key/value heads repeated by hand."""
    cfg = model.cfg
    raw = qs.model.weights.kv_weight(model, layer, "W_K")  # the parameter (or its view on a bridge)
    assert raw.shape[0] == (cfg.n_key_value_heads or cfg.n_heads)
    return raw.detach().double().repeat_interleave(cfg.n_heads // raw.shape[0], dim=0)


@SETTINGS
@given(arch=architectures(), scale=st.floats(1e-3, 1e3), data=st.data())
def test_injection_identity_and_bit_for_bit_restore(arch: dict, scale: float, data: st.DataObject) -> None:
    model = _build(arch)
    cfg = model.cfg
    heads = torch.tensor(
        data.draw(
            st.lists(st.booleans(), min_size=cfg.n_layers * cfg.n_heads, max_size=cfg.n_layers * cfg.n_heads)
        )
    ).reshape(cfg.n_layers, cfg.n_heads)
    g = torch.Generator().manual_seed(arch["seed"])
    target = scale * torch.randn(
        cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, generator=g, dtype=torch.float64
    )
    before = param_snapshot(model)
    hashes = param_hashes(model)
    raise_inside = data.draw(st.booleans())
    try:
        with qs.inject_qk(model, target, heads=heads, cond_warn=float("inf")) as edit:
            for layer in range(cfg.n_layers):
                W_K = _wk_per_query_head(model, layer)
                old_Q = before[f"blocks.{layer}.attn.W_Q"].double()
                new_Q = model.blocks[layer].attn.W_Q.detach()
                for h in range(cfg.n_heads):
                    if not heads[layer, h]:
                        assert torch.equal(new_Q[h], before[f"blocks.{layer}.attn.W_Q"][h])
                        continue
                    Wk, Wq = W_K[h], new_Q[h].double()
                    G = Wk.T @ Wk
                    cond = float(torch.linalg.cond(G))
                    T = target[layer, h]
                    delta = T - old_Q[h].T @ Wk
                    tol = 64 * EPS64 * cond * (delta.norm() + T.norm()) + 64 * EPS64 * Wq.norm() * Wk.norm()
                    if arch["dtype"] == torch.float32:
                        tol = tol + 2 * EPS32 * Wq.norm() * Wk.norm()
                    assert (Wq.T @ Wk - T).norm() <= tol, (layer, h, cond)
                    if arch["dtype"] == torch.float64:
                        # the part of W_Q outside span(W_K) is kept
                        P_perp = torch.eye(cfg.d_model, dtype=torch.float64) - Wk @ torch.linalg.pinv(Wk)
                        assert (P_perp @ (Wq - old_Q[h])).norm() <= 64 * EPS64 * cond * (
                            Wq.norm() + old_Q[h].norm()
                        )
            for measure in (edit.residual, edit.max_abs_error):  # relative Frobenius and entrywise
                assert measure.shape == (cfg.n_layers, cfg.n_heads)
                assert torch.all(measure[~heads] == 0)
            assert {n for n in changed_weights(model, before) if not n.endswith("attn.W_Q")} == set()
            if raise_inside:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        assert raise_inside
    assert param_hashes(model) == hashes


@SETTINGS
@given(arch=architectures(), data=st.data())
def test_random_nested_edits_restore_bit_for_bit_at_every_level(arch: dict, data: st.DataObject) -> None:
    model = _build(arch)
    cfg = model.cfg
    depth = data.draw(st.integers(1, 3))
    fail_at = data.draw(st.integers(0, depth))  # 0: no exception
    snapshots: list[dict[str, str]] = []

    def level(i: int) -> None:
        snapshots.append(param_hashes(model))
        if i > depth:
            return
        n = cfg.n_layers * cfg.n_heads
        flat = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
        g = torch.Generator().manual_seed(arch["seed"] + i)
        target = torch.randn(
            cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, generator=g, dtype=torch.float64
        )
        with qs.inject_qk(model, target, heads=flat, cond_warn=float("inf")):
            level(i + 1)
            if i == fail_at:
                raise RuntimeError(f"fault at level {i}")
        assert param_hashes(model) == snapshots[i - 1], f"level {i} did not restore its entry state"

    try:
        level(1)
    except RuntimeError as exc:
        assert fail_at and str(exc) == f"fault at level {fail_at}"
    assert param_hashes(model) == snapshots[0]
    assert qs.active_edits(model) == []


@st.composite
def head_matrices(draw: st.DrawFn) -> np.ndarray:
    n_layers = draw(st.integers(1, 3))
    n_heads = draw(st.integers(2 if n_layers == 1 else 1, 5))
    d = draw(st.integers(1, 4))
    # entries below 1e-100 in magnitude are zero: their squares underflow float64, and no PCA is exact there
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64).map(
        lambda x: x if abs(x) > 1e-100 else 0.0
    )
    return draw(arrays(np.float64, (n_layers, n_heads, d, d), elements=elements))


@settings(max_examples=100, deadline=None)
@given(W=head_matrices())
@example(W=np.ones((1, 3, 2, 2)))  # identical heads: zero total variance
def test_headpca_reconstruction_error_is_monotone_and_optimal(W: np.ndarray) -> None:
    pca = qs.HeadPCA().fit(torch.from_numpy(W))
    n = pca.n_heads_
    X = W.reshape(n, -1)
    Xc = X - X.mean(0)
    s = np.linalg.svd(Xc, compute_uv=False)  # independent of sklearn
    scale = np.linalg.norm(Xc) + np.abs(X).max() + 1e-300
    errs = [pca.reconstruction_error(W, K) for K in range(n + 1)]
    tol = 1e-9 * scale
    for K in range(n):
        assert errs[K + 1] <= errs[K] + tol, (K, errs)
    # Eckart-Young: the top-K error is the energy beyond the K-th singular value
    for K, err in enumerate(errs):
        assert err == pytest.approx(float(np.sqrt(np.sum(s[K:] ** 2))), abs=tol)
    assert errs[0] == pytest.approx(float(np.linalg.norm(Xc)), abs=tol)
    assert errs[n] <= tol
    assert errs[min(pca.n_nonzero_components_, n)] <= 1e-6 * scale
    # variance bookkeeping stays finite even when every head is the same (zero total variance)
    cum = pca.cumulative_variance_
    assert np.all(np.isfinite(cum)) and np.all(np.diff(cum) >= -1e-12)
    assert cum[-1] == pytest.approx(1.0 if pca.explained_variance_.sum() > 0 else 0.0, abs=1e-9)
