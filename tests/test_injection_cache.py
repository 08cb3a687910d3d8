"""The per-layer cache behind inject_qk: it must never serve values from weights that changed.

Every test injects once (filling the cache), changes W_K or W_Q by some route, injects again and
checks the result against an independent float64 computation on the weights as they are now: a
stale cache would miss the target by O(1).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import qk_subspace as qs
from qk_subspace.edits import qk as injection
from tests.conftest import assert_params_equal, make_model, param_snapshot


def _target(model, seed: int = 0) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, generator=g, dtype=torch.float64)


def _key_param(model, layer: int) -> torch.Tensor:
    """The key weight, one per key/value head: the parameter (hooked) or a view of it (bridge)."""
    return qs.model.weights.kv_weight(model, layer, "W_K")


def _per_query_head_keys(model, layer: int) -> torch.Tensor:
    return qs.model.weights.attention_weight(model, layer, "W_K")


def _check_injection(model, target: torch.Tensor) -> None:
    """Inject and compare with qk_injection_weights and a by-hand W_Q^T W_K on the live weights."""
    expected = [
        qs.edits.qk.qk_injection_weights(
            b.attn.W_Q.detach(), _per_query_head_keys(model, i).detach(), target[i]
        )
        for i, b in enumerate(model.blocks)
    ]
    before = param_snapshot(model)
    with qs.inject_qk(model, target) as edit:
        for i, block in enumerate(model.blocks):
            W_Q = block.attn.W_Q.detach().double()
            W_K = _per_query_head_keys(model, i).detach().double()
            torch.testing.assert_close(W_Q, expected[i], rtol=0, atol=1e-10)
            qk = W_Q.transpose(-1, -2) @ W_K
            torch.testing.assert_close(qk, target[i], rtol=0, atol=1e-10)
            torch.testing.assert_close(
                edit.max_abs_error[i], (qk - target[i]).abs().amax(dim=(-1, -2)), rtol=0, atol=1e-13
            )
    assert_params_equal(model, before)


def _inplace_wk(model) -> None:
    with torch.no_grad():  # a user's direct write (allowed in tests; package code uses ParameterEdit)
        _key_param(model, 1).mul_(2.0)


def _inplace_wq(model) -> None:
    with torch.no_grad():
        model.blocks[0].attn.W_Q[1].add_(0.5)


def _data_write_wk(model) -> None:
    # writes through .data bypass torch's version counter; the cache must still notice
    _key_param(model, 0).data.mul_(-1.5)


def _data_write_wq(model) -> None:
    model.blocks[1].attn.W_Q.data[0, 0, 0] += 1.0


def _load_state_dict(model) -> None:
    other = make_model((model.cfg.n_key_value_heads and "gqa") or "mha", dtype=torch.float64, seed=7)
    model.load_state_dict(other.state_dict())


def _swap_parameter(model) -> None:
    attn = model.blocks[0].attn
    if qs.model.backends.name_of(model) == "bridge":  # the Hugging Face key projection's weight
        linear = attn.k.original_component
        linear.weight = torch.nn.Parameter(linear.weight.detach() * 3.0)
        return
    name = "_W_K" if hasattr(attn, "_W_K") else "W_K"
    setattr(attn, name, torch.nn.Parameter(_key_param(model, 0).detach() * 3.0))


CHANGES: dict[str, Callable[[torch.nn.Module], None]] = {
    "in-place W_K mul_": _inplace_wk,
    "in-place W_Q add_": _inplace_wq,
    "W_K .data write": _data_write_wk,
    "W_Q .data write": _data_write_wq,
    "load_state_dict": _load_state_dict,
    "parameter replaced": _swap_parameter,
}


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_cache_invalidated_by_writes(kind: str, change: str) -> None:
    model = make_model(kind, dtype=torch.float64)
    target = _target(model)
    _check_injection(model, target)
    CHANGES[change](model)
    _check_injection(model, target)
    _check_injection(model, _target(model, seed=1))


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_cache_invalidated_by_an_outer_edit(kind: str) -> None:
    model = make_model(kind, dtype=torch.float64)
    target = _target(model)
    _check_injection(model, target)
    kname, _ = qs.model.weights.key_parameter_names(model, 1)
    plan = {
        kname: _key_param(model, 1).detach() * 0.25,
        "blocks.0.attn.W_Q": model.blocks[0].attn.W_Q.detach() + 1.0,
    }
    with qs.ParameterEdit(model, plan):
        _check_injection(model, target)  # inside the outer edit
    _check_injection(model, target)  # and after it restored the weights


def test_cache_is_reused_while_weights_are_unchanged() -> None:
    model = make_model("mha", dtype=torch.float64)
    injection.clear_injection_cache(model)
    _check_injection(model, _target(model))
    entries = dict(injection._QK_CACHE[model])
    assert sorted(entries) == [0, 1]
    _check_injection(model, _target(model, seed=2))
    assert all(injection._QK_CACHE[model][k] is v for k, v in entries.items())  # a hit, not a rebuild
    _inplace_wk(model)
    _check_injection(model, _target(model))
    assert injection._QK_CACHE[model][0] is entries[0] and injection._QK_CACHE[model][1] is not entries[1]
    injection.clear_injection_cache(model)
    assert model not in injection._QK_CACHE


def test_float32_residual_is_measured_on_written_weights() -> None:
    model = make_model("gqa", dtype=torch.float32)
    target = _target(model)
    with qs.inject_qk(model, target) as edit:
        pass
    _inplace_wk(model)  # invalidates layer 1; the residual must still be the measured one
    with qs.inject_qk(model, target) as edit:
        qk = torch.stack(
            [
                b.attn.W_Q.detach().double().transpose(-1, -2)
                @ _per_query_head_keys(model, i).detach().double()
                for i, b in enumerate(model.blocks)
            ]
        )
        measured = (qk - target).abs().amax(dim=(-1, -2))
        torch.testing.assert_close(edit.max_abs_error, measured, rtol=0, atol=1e-13)
        assert edit.max_abs_error.max() > 0  # float32 round-off is reported


def test_thread_setting_restored() -> None:
    model = make_model("mha", dtype=torch.float64)
    previous = torch.get_num_threads()
    with qs.inject_qk(model, _target(model)):
        assert torch.get_num_threads() == previous
    assert torch.get_num_threads() == previous


def test_cache_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("gqa", dtype=torch.float64)
    injection.clear_injection_cache(model)
    monkeypatch.setattr(injection, "INJECTION_CACHE_MAX_BYTES", 0)
    _check_injection(model, _target(model))  # computed afresh, same results
    assert not injection._QK_CACHE.get(model)
    monkeypatch.setattr(injection, "INJECTION_CACHE_MAX_BYTES", 2**40)
    _check_injection(model, _target(model))
    entries = injection._QK_CACHE[model]
    assert sorted(entries) == [0, 1]
    limit = entries[0].nbytes  # room for one layer only
    injection.clear_injection_cache(model)
    monkeypatch.setattr(injection, "INJECTION_CACHE_MAX_BYTES", limit)
    _check_injection(model, _target(model, seed=3))
    assert sorted(injection._QK_CACHE[model]) == [0]
    _check_injection(model, _target(model, seed=4))
