"""The two TransformerLens backends: choosing one, the bridge's weight slots, and equal results.

The rest of the suite runs on whichever backend ``load_model(backend="auto")`` gives (set
``QK_SUBSPACE_BACKEND=bridge`` to run it on the bridge under transformer-lens 3.x); this file tests
what is specific to the choice, and the bridge against HookedTransformer on the real stories260K.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import qk_subspace as qs
from qk_subspace.cli import main
from qk_subspace.model import backends, fastpath
from qk_subspace.model.embedded import EMBEDDED_DIR
from qk_subspace.model.weights import weight_slots
from tests.conftest import load_tool, make_bridge, requires_hooked, requires_shared, tiny_hf_model
from tests.test_integrity import param_hashes

REFERENCE = Path(__file__).resolve().parent / "golden" / "backends.json"
TOOL = load_tool("backend_reference")


# ------------------------------------------------------------------------------------ choosing
def test_auto_follows_transformer_lens_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    expected = "hooked" if backends.has_hooked_transformer() else "bridge"
    assert backends.resolve("auto") == expected and backends.resolve("bridge") == "bridge"
    monkeypatch.setenv(backends.BACKEND_ENV, "bridge")
    assert backends.resolve("auto") == "bridge"
    monkeypatch.setenv(backends.BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match=backends.BACKEND_ENV):
        backends.resolve("auto")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'hooked', 'bridge'\]"):
        backends.resolve("Hooked")


def test_hooked_is_refused_where_transformer_lens_deleted_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(backends, "transformer_lens_version", lambda: "4.3.0")
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert backends.resolve("auto") == "bridge"
    with pytest.raises(ValueError, match=r"transformer-lens 4\.3\.0 no longer has"):
        qs.load_model("stories260K", backend="hooked")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--backend", "hooked", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend" in err[0] and "bridge" in err[0]
    assert not (tmp_path / "results").exists()


def test_name_of_refuses_other_modules() -> None:
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        backends.name_of(torch.nn.Linear(2, 2))
    assert fastpath.unsupported_reason(torch.nn.Linear(2, 2)) is not None


def test_embedded_model_on_the_bridge_records_its_backend(tmp_path: Path) -> None:
    model = qs.load_model("stories260K", backend="bridge")
    assert backends.name_of(model) == "bridge" and model.qk_subspace_backend == "bridge"
    assert backends.architecture(model) == "LlamaForCausalLM" and not backends.has_qk_norm(model)
    assert fastpath.unsupported_reason(model) is None
    res = qs.run_experiment(
        model, tmp_path, ks=(0, 40), cluster_ks=(4,), n_tokens=2048, png=False, progress=False
    )
    data = json.loads(Path(res.path).read_text())
    assert data["metadata"]["backend"] == "bridge" and data["metadata"]["model"] == "stories260K"
    assert data["checks"]["k_all"]["ok"]


def test_a_local_checkpoint_without_tokenizer_needs_one_on_the_bridge(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=60)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer="):
        qs.load_model(tmp_path, backend="bridge")
    model = qs.load_model(tmp_path, backend="bridge", tokenizer=str(EMBEDDED_DIR))  # no n_ctx needed here
    assert model.cfg.n_layers == 1 and backends.name_of(model) == "bridge"


# ------------------------------------------------------------------------------- weight slots
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_attention_slots_are_views_of_the_parameters_the_forward_reads(kind: str) -> None:
    model = make_bridge(kind, dtype=torch.float64)
    slots = weight_slots(model)
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    for layer in range(cfg.n_layers):
        attn = model.blocks[layer].attn
        q, k = slots[f"blocks.{layer}.attn.W_Q"], slots[f"blocks.{layer}.attn.W_K"]
        assert q.shape == (cfg.n_heads, cfg.d_model, cfg.d_head) and k.shape == (
            n_kv,
            cfg.d_model,
            cfg.d_head,
        )
        assert (
            q.parameter is attn.q.original_component.weight
            and k.parameter is attn.k.original_component.weight
        )
        assert torch.equal(q.value(), attn.W_Q) and torch.equal(k.value(), attn.W_K)
    # the gradient of a weight, in its layout, by either route (strided view or gathered copy)
    q = slots["blocks.0.attn.W_Q"]
    g = torch.randn(q.parameter.shape, dtype=torch.float64)
    assert torch.equal(q.of(g.contiguous()), q.of(torch.empty_like(g).copy_(g)))
    rows = q.parameter.shape[0]
    manual = g.T.reshape(cfg.d_model, cfg.n_heads, cfg.d_head).permute(1, 0, 2) if kind == "mha" else None
    if manual is None:  # a Linear: weight [n_heads * d_head, d_model]
        manual = g.reshape(cfg.n_heads, rows // cfg.n_heads, cfg.d_model).transpose(1, 2)
    assert torch.equal(q.of(g), manual)


def test_an_edit_writes_the_hugging_face_parameter_and_restores_it_bit_for_bit() -> None:
    model = make_bridge("gqa", dtype=torch.float32)
    before = param_hashes(model)
    q_proj = model.blocks[1].attn.q.original_component.weight
    target = qs.qk_matrices(model) * 0.5
    with qs.inject_qk(model, target) as edit:
        assert param_hashes(model) != before and edit.max_abs_error.max() < 1e-5
        torch.testing.assert_close(qs.qk_matrices(model), target, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.blocks[1].attn.W_Q, q_proj.detach().reshape(4, 8, 32).transpose(1, 2))
    assert param_hashes(model) == before
    with pytest.raises(KeyError, match=r"blocks\.9\.attn\.W_Q"):
        qs.ParameterEdit(model, {"blocks.9.attn.W_Q": torch.zeros(1)}).__enter__()


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("processing", [True, False])
def test_fast_path_on_a_loaded_bridge_matches_its_forward(
    kind: str, processing: bool, tmp_path: Path
) -> None:
    """A saved checkpoint loaded as a bridge, with and without TransformerLens' weight processing."""
    tiny_hf_model(kind, dtype=torch.float64).save_pretrained(tmp_path)
    flags = (
        {} if processing else dict.fromkeys(("fold_ln", "center_writing_weights", "center_unembed"), False)
    )
    if not processing:  # the bridge cannot fold grouped-query value biases without fold_ln: a clear error
        with pytest.raises(ValueError, match="fold_value_biases=False") if kind == "gqa" else nullcontext():
            qs.load_model(tmp_path, backend="bridge", tokenizer=str(EMBEDDED_DIR), **flags)
        flags["fold_value_biases"] = False
    for dtype in (torch.float64, torch.float32):
        model = qs.load_model(tmp_path, backend="bridge", tokenizer=str(EMBEDDED_DIR), dtype=dtype, **flags)
        assert fastpath.unsupported_reason(model) is None
        toks = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(2))
        fast = qs.perplexity(model, toks, progress=False)
        std = qs.perplexity(model, toks, progress=False, fast=False)
        assert fast.path == "fast" and std.path == "standard"
        np.testing.assert_allclose(fast.nll_per_chunk, std.nll_per_chunk, rtol=1e-5)
        model.run_with_cache(toks)  # the bridge's own capture hooks do not count as hooks
        assert fastpath.unsupported_reason(model) is None
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p)]):
            assert "hooks attached" in (fastpath.unsupported_reason(model) or "")


# ------------------------------------------------------------------- equal results, real model
def _acceptance_figures(model: Any) -> dict[str, Any]:
    """Bit-for-bit restore after every edit, and diagnostics: KL > 0 at K = 3 and 0 at K = all."""
    before = param_hashes(model)
    fig = TOOL.figures(model)
    assert param_hashes(model) == before
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    toks = TOOL.tokens(model)[:2, :64]
    for k, nonzero in ((3, True), (pca.n_heads_, False)):
        df = qs.evaluation.diagnostics.attention_diagnostics(model, toks, pca.reconstruct(k))
        assert (df["kl"].max() > 1e-4) if nonzero else (df["kl"].abs().max() < 1e-6), (k, df["kl"].max())
        assert param_hashes(model) == before
    return fig


def _assert_same(bridge: dict[str, Any], hooked: dict[str, Any]) -> None:
    np.testing.assert_allclose(bridge["qk_norms"], hooked["qk_norms"], rtol=1e-6)
    np.testing.assert_allclose(
        bridge["qk_singular_values"], hooked["qk_singular_values"], rtol=1e-6, atol=1e-9
    )
    assert bridge["ppl"] == pytest.approx(hooked["ppl"], rel=1e-5)
    assert bridge["ppl_K10"] == pytest.approx(hooked["ppl_K10"], rel=1e-4)
    assert bridge["ppl_K_all"] == pytest.approx(bridge["ppl"], rel=1e-5)  # K = all reproduces the baseline


@requires_shared
def test_bridge_reproduces_the_recorded_hooked_transformer_results() -> None:
    reference = json.loads(REFERENCE.read_text())
    assert reference["backend"] == "hooked" and len(reference["qk_norms"]) == 40
    bridge = qs.load_model(TOOL.MODEL, backend="bridge")
    _assert_same(_acceptance_figures(bridge), reference)


@requires_shared
@requires_hooked
def test_bridge_equals_a_live_hooked_transformer() -> None:
    hooked = qs.load_model(TOOL.MODEL, backend="hooked")
    bridge = qs.load_model(TOOL.MODEL, backend="bridge")
    torch.testing.assert_close(qs.qk_matrices(bridge), qs.qk_matrices(hooked), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(qs.ov_matrices(bridge), qs.ov_matrices(hooked), rtol=1e-5, atol=1e-7)
    _assert_same(_acceptance_figures(bridge), TOOL.figures(hooked))
