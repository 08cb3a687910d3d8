"""TransformerLens-native checkpoints: ``hooked_transformer_config.json`` + ``model.safetensors``.

The checkpoints are written from plain tensors under HookedTransformer's state-dict names and checked
against a forward written out here (attention only, with or without LayerNorm), on every backend the
installed TransformerLens has; on transformer-lens 3.x also against a HookedTransformer built from
the same configuration and processed the same way, for configurations beyond attention only. Refused
directories (pickled weights, bad configurations, weights that do not match) never unpickle anything.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import qk_subspace as qs
from qk_subspace.model import backends, native
from qk_subspace.model.backends import bridge as bridge_backend
from qk_subspace.model.embedded import EMBEDDED_DIR
from qk_subspace.model.loading import DEFAULT_PROCESSING
from qk_subspace.model.weights import attention_factors
from tests.conftest import TEST_BACKEND, requires_hooked
from tests.test_safe_loading import Payload

INDUCTION = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "induction-2l"
BACKENDS = [pytest.param("hooked", marks=requires_hooked), "bridge"]
NO_PROCESSING = dict.fromkeys(DEFAULT_PROCESSING, False)
SHAPE = dict(n_layers=2, n_heads=2, d_model=16, d_head=8, d_vocab=50, n_ctx=32)


# ----------------------------------------------------------------------------- fixtures
def plain_checkpoint(norm: str | None, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config fields, HookedTransformer state dict)`` of an attention-only model with random weights
    and biases, written from plain tensors (no TransformerLens class needed)."""
    n_layers, h, m, d, v, n_ctx = (
        SHAPE[k] for k in ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx")
    )
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3, mean: float = 0.0) -> torch.Tensor:
        return mean + scale * torch.randn(*shape, generator=g)

    sd = {"embed.W_E": r(v, m, scale=0.8), "pos_embed.W_pos": r(n_ctx, m, scale=0.5)}
    for layer in range(n_layers):
        a = f"blocks.{layer}.attn."
        for x in "QKV":
            sd[a + f"W_{x}"] = r(h, m, d)
            sd[a + f"b_{x}"] = r(h, d, scale=0.1)
        sd[a + "W_O"] = r(h, d, m)
        sd[a + "b_O"] = r(m, scale=0.1)
        if norm == "LN":
            sd[f"blocks.{layer}.ln1.w"] = r(m, scale=0.2, mean=1.0)
            sd[f"blocks.{layer}.ln1.b"] = r(m, scale=0.1)
    if norm == "LN":
        sd["ln_final.w"] = r(m, scale=0.2, mean=1.0)
        sd["ln_final.b"] = r(m, scale=0.1)
    sd["unembed.W_U"] = r(m, v)
    sd["unembed.b_U"] = r(v, scale=0.1)
    cfg = {**SHAPE, "attn_only": True, "normalization_type": norm, "positional_embedding_type": "standard"}
    return cfg, sd


def save(path: Path, cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / native.CONFIG_FILE).write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / native.WEIGHTS_FILE))
    return path


def hand_forward(cfg: dict[str, Any], sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, pos, d_vocab]`` (float64) of the attention-only model, written out: embeddings
    plus learned positions; per layer optional LayerNorm, q/k/v per head, causal softmax(q k^T / sqrt(d_head)),
    z W_O + b_O added to the residual; optional final LayerNorm; resid W_U + b_U."""
    w = {k: t.double() for k, t in sd.items()}
    eps = 1e-5

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        if cfg["normalization_type"] is None:
            return x
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        return x * w[f"{name}.w"] + w[f"{name}.b"]

    T = tokens.shape[1]
    resid = w["embed.W_E"][tokens] + w["pos_embed.W_pos"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(cfg["n_layers"]):
        a = f"blocks.{layer}.attn."
        x = ln(resid, f"blocks.{layer}.ln1")
        q, k, v = (
            torch.einsum("btm,hmd->bhtd", x, w[a + f"W_{n}"]) + w[a + f"b_{n}"][None, :, None] for n in "QKV"
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg["d_head"])
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = pattern @ v  # [b, h, t, d_head]
        resid = resid + torch.einsum("bhtd,hdm->btm", z, w[a + "W_O"]) + w[a + "b_O"]
    return ln(resid, "ln_final") @ w["unembed.W_U"] + w["unembed.b_U"]


def tokens_for(seed: int = 3, batch: int = 3, pos: int = 20) -> torch.Tensor:
    return torch.randint(0, SHAPE["d_vocab"], (batch, pos), generator=torch.Generator().manual_seed(seed))


def logits_of(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, return_type="logits").double()


# ----------------------------------------------------------------------------- equal results
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [None, "LN"])
@pytest.mark.parametrize("processing", [True, False])
def test_loaded_model_computes_the_hand_written_forward(
    tmp_path: Path, backend: str, norm: str | None, processing: bool
) -> None:
    cfg, sd = plain_checkpoint(norm)
    path = save(tmp_path / "ckpt", cfg, sd)
    flags = {} if processing else NO_PROCESSING
    model = qs.load_model(path, backend=backend, **flags)
    assert backends.name_of(model) == backend and model.qk_subspace_backend == backend
    assert model.qk_subspace_source == str(path.resolve()) and model.qk_subspace_offline is True
    assert model.qk_subspace_processing == {**DEFAULT_PROCESSING, **flags}
    assert model.tokenizer is None and not model.training
    toks = tokens_for()
    got, want = logits_of(model, toks), hand_forward(cfg, sd, toks)
    if processing:  # center_unembed shifts every logit of a position by the same amount
        got, want = got.log_softmax(-1), want.log_softmax(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_and_device_are_honoured(tmp_path: Path, backend: str) -> None:
    cfg, sd = plain_checkpoint("LN")
    path = save(tmp_path / "ckpt", cfg, sd)
    model = qs.load_model(path, backend=backend, dtype=torch.float64, device="cpu", **NO_PROCESSING)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    toks = tokens_for()
    torch.testing.assert_close(logits_of(model, toks), hand_forward(cfg, sd, toks), rtol=0, atol=1e-6)
    half = qs.load_model(path, backend=backend, dtype=torch.bfloat16, **NO_PROCESSING)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_package_works_on_a_native_model(tmp_path: Path, backend: str) -> None:
    """Per-head factors are the file's, an edit of W_Q changes the output and is undone bit for bit,
    and perplexity (fast path or not) is the hand-computed mean NLL."""
    cfg, sd = plain_checkpoint(None)
    model = qs.load_model(save(tmp_path / "ckpt", cfg, sd), backend=backend)  # default processing
    W_Q, W_K = attention_factors(model)
    assert W_Q.shape == (2, 2, 16, 8)
    for layer in range(2):  # no LayerNorm: the processing leaves W_Q and W_K as they are
        torch.testing.assert_close(W_Q[layer], sd[f"blocks.{layer}.attn.W_Q"].double(), rtol=0, atol=0)
        torch.testing.assert_close(W_K[layer], sd[f"blocks.{layer}.attn.W_K"].double(), rtol=0, atol=0)
    toks = tokens_for(batch=4)
    before = logits_of(model, toks)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with qs.ParameterEdit(model, {"blocks.0.attn.W_Q": torch.zeros(2, 16, 8)}):
        assert attention_factors(model)[0][0].abs().max() == 0
        assert (logits_of(model, toks) - before).abs().max() > 1e-3
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits_of(model, toks), before)
    logp = hand_forward(cfg, sd, toks).log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, toks[:, 1:, None]).squeeze(-1)
    for fast in (True, False):
        res = qs.perplexity(model, toks, progress=False, fast=fast)
        assert res.mean_nll == pytest.approx(float(nll.mean()), abs=1e-5)


@requires_hooked
@pytest.mark.parametrize(
    "extra",
    [
        dict(attn_only=True, normalization_type=None),
        dict(attn_only=True),
        dict(act_fn="gelu_new"),
        dict(act_fn="gelu", normalization_type="LNPre", d_vocab_out=40),
        dict(act_fn="silu", normalization_type="RMS", gated_mlp=True, n_key_value_heads=1),
        dict(normalization_type="RMSPre", final_rms=True, eps=1e-3),
        dict(
            positional_embedding_type="rotary",
            rotary_dim=4,
            rotary_adjacent_pairs=True,
            normalization_type="RMS",
        ),
        dict(attn_only=True, attn_scores_soft_cap=5.0, attn_scale=2.0, d_head=4),
    ],
    ids=["attn-none", "attn-LN", "mlp-LN", "mlp-LNPre", "gated-RMS-gqa", "RMSPre-final", "rotary", "softcap"],
)
def test_both_backends_equal_a_processed_hooked_transformer(tmp_path: Path, extra: dict[str, Any]) -> None:
    """HookedTransformer's own state dict, saved; each backend against HookedTransformer built from the same
    configuration with load_and_process_state_dict (default processing, and none: the raw model)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = {**SHAPE, "d_mlp": 24, **extra}
    model = HookedTransformer(HookedTransformerConfig(**cfg, seed=0))
    g = torch.Generator().manual_seed(1)
    gated = bool(cfg.get("gated_mlp"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in ("b_Q", "b_K", "b_V", "b_O", "_b_K", "_b_V", "b_U", "b") or (
                leaf in ("b_in", "b_out") and not gated  # the bridge's gated MLP has no biases
            ):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif leaf == "w":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = save(tmp_path / "ckpt", cfg, state)
    toks = tokens_for()
    for flags in ({}, NO_PROCESSING):
        proc = {**DEFAULT_PROCESSING, **flags}
        ref = HookedTransformer(HookedTransformerConfig(**cfg))
        ref.load_and_process_state_dict({k: v.clone() for k, v in state.items()}, **proc)
        want = logits_of(ref, toks)
        if not flags:
            raw = logits_of(model, toks)  # the processing keeps the function (up to a shift of the logits)
            torch.testing.assert_close(want.log_softmax(-1), raw.log_softmax(-1), rtol=0, atol=2e-5)
        for backend in ("hooked", "bridge"):
            got = logits_of(qs.load_model(path, backend=backend, **flags), toks)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=f"{backend} {flags}")


@requires_hooked
def test_refactored_attention_matrices_agree(tmp_path: Path) -> None:
    cfg, sd = plain_checkpoint("LN")
    path = save(tmp_path / "ckpt", cfg, sd)
    toks = tokens_for()
    hooked, bridge = (
        qs.load_model(path, backend=b, refactor_factored_attn_matrices=True) for b in ("hooked", "bridge")
    )
    torch.testing.assert_close(logits_of(bridge, toks), logits_of(hooked, toks), rtol=1e-5, atol=5e-5)
    want = hand_forward(cfg, sd, toks).log_softmax(-1)
    torch.testing.assert_close(logits_of(hooked, toks).log_softmax(-1), want, rtol=0, atol=5e-5)


@requires_hooked
def test_the_recorded_schema_is_hooked_transformer_config() -> None:
    import dataclasses

    from transformer_lens import HookedTransformerConfig

    fields = {f.name: f for f in dataclasses.fields(HookedTransformerConfig)}
    assert set(native.HOOKED_CONFIG_DEFAULTS) <= set(fields)
    for name, value in native.HOOKED_CONFIG_DEFAULTS.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert default == value, name
    assert set(native.REQUIRED_FIELDS) | {"dtype"} <= set(fields)


def test_the_bridge_classifies_every_config_field() -> None:
    known = set(native.HOOKED_CONFIG_DEFAULTS) | {"d_model", "d_head", "n_layers", "n_ctx", "dtype"}
    honoured, inert = bridge_backend._NATIVE_HONOURED, bridge_backend._NATIVE_INERT
    assert not (honoured | inert) - known and not honoured & inert


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tokenizer_is_taken_from_the_argument_or_the_directory(tmp_path: Path, backend: str) -> None:
    cfg, sd = plain_checkpoint(None)
    path = save(tmp_path / "ckpt", cfg, sd)
    given = qs.load_model(path, backend=backend, tokenizer=str(EMBEDDED_DIR))
    assert given.tokenizer is not None and given.tokenizer.decode(given.tokenizer.encode("Once")).endswith(
        "Once"
    )
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_DIR / name, path / name)
    found = qs.load_model(path, backend=backend)
    assert found.tokenizer is not None and found.tokenizer.vocab_size == given.tokenizer.vocab_size


def test_the_native_config_wins_over_a_hugging_face_one(tmp_path: Path) -> None:
    cfg, sd = plain_checkpoint(None)
    path = save(tmp_path / "ckpt", cfg, sd)
    (path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    model = qs.load_model(path, **NO_PROCESSING)
    toks = tokens_for()
    torch.testing.assert_close(logits_of(model, toks), hand_forward(cfg, sd, toks), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load and pickle.load(s) raise: whatever passes under this fixture never unpickled anything."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.usefixtures("no_unpickling")
@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_never_unpickles(tmp_path: Path, backend: str) -> None:
    cfg, sd = plain_checkpoint("LN")
    model = qs.load_model(save(tmp_path / "ckpt", cfg, sd), backend=backend)
    assert model.cfg.n_layers == 2


def test_pickled_weights_are_refused_unopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, sd = plain_checkpoint(None)
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / native.CONFIG_FILE).write_text(json.dumps(cfg))
    marker = tmp_path / "payload_ran"
    torch.save({**sd, "payload": Payload(marker)}, path / "model.pth")
    torch.load(path / "model.pth", weights_only=False)  # the unsafe way, on purpose: the payload is live
    assert marker.is_dir()
    marker.rmdir()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    for name in ("model.pth", "pytorch_model.bin"):
        if name != "model.pth":
            (path / "model.pth").rename(path / name)
        with pytest.raises(ValueError, match=rf"\['{name}'\] are pickle files.*arbitrary code.*safetensors"):
            qs.load_model(path)
        assert not marker.exists()


@pytest.mark.parametrize(
    "config_text, error, match",
    [
        ("{not json", ValueError, r"hooked_transformer_config\.json is not valid JSON"),
        ("[1, 2]", ValueError, r"must hold a JSON object of HookedTransformerConfig fields, got list"),
        (
            json.dumps({**SHAPE, "n_layer": 2}),
            ValueError,
            r"sets \['n_layer'\], which are not HookedTransformerConfig",
        ),
        (
            json.dumps({k: v for k, v in SHAPE.items() if k != "d_vocab"}),
            ValueError,
            r"missing: \['d_vocab'\]",
        ),
    ],
    ids=["invalid-json", "not-an-object", "unknown-field", "missing-field"],
)
def test_bad_configs_are_refused(tmp_path: Path, config_text: str, error: type, match: str) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / native.CONFIG_FILE).write_text(config_text)
    with pytest.raises(error, match=match):
        qs.load_model(path)


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / native.CONFIG_FILE).write_text(json.dumps(SHAPE))
    with pytest.raises(
        FileNotFoundError, match=r"has hooked_transformer_config\.json but no model\.safetensors"
    ):
        qs.load_model(path)
    (path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"found \['model-00001-of-00002\.safetensors'\]"):
        qs.load_model(path)
    (path / native.WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        qs.load_model(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path, backend: str) -> None:
    cfg, sd = plain_checkpoint("LN")
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "blocks.1.attn.W_K"}, r"lacks the weights \['blocks\.1\.attn\.W_K'\]"),
        "unexpected": ({**sd, "blocks.0.mlp.W_in": torch.zeros(16, 64)}, r"entries \['blocks\.0\.mlp\.W_in'\]"),
        "shape": ({**sd, "blocks.0.attn.W_Q": torch.zeros(4, 16, 4)}, r"blocks\.0\.attn\.W_Q: \(4, 16, 4\) in the file, \(2, 16, 8\)"),
    }  # fmt: skip
    for name, (state, match) in cases.items():
        path = save(tmp_path / name, cfg, state)
        with pytest.raises(ValueError, match=match):
            qs.load_model(path, backend=backend)
    # buffers HookedTransformer saves (causal mask, IGNORE) may be present or absent: rebuilt from the config
    path = save(
        tmp_path / "buffers",
        cfg,
        {**sd, "blocks.0.attn.mask": torch.ones(32, 32), "blocks.0.attn.IGNORE": torch.tensor(-1e5)},
    )
    toks = tokens_for()
    got = logits_of(qs.load_model(path, backend=backend, **NO_PROCESSING), toks)
    torch.testing.assert_close(got, hand_forward(cfg, sd, toks), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(positional_embedding_type="rotary"), r"rotary_adjacent_pairs=False"),
        (dict(use_attn_scale=False), r"use_attn_scale=False"),
        (dict(output_logits_soft_cap=30.0), r"output-logit soft-capping"),
        (dict(use_local_attn=True), r"use_local_attn=True \(only the default False"),
        (dict(positional_embedding_type="shortformer"), r"positional_embedding_type='shortformer'"),
    ],
)
def test_the_bridge_refuses_what_it_would_compute_differently(
    tmp_path: Path, extra: dict[str, Any], match: str
) -> None:
    cfg, sd = plain_checkpoint(None)
    path = save(tmp_path / "ckpt", {**cfg, **extra}, sd)
    instead = "backend='hooked'" if backends.has_hooked_transformer() else r"transformer-lens<4"
    with pytest.raises(ValueError, match=rf"{match}.*{instead}"):
        qs.load_model(path, backend="bridge")


def test_the_bridge_refuses_non_zero_gated_mlp_biases(tmp_path: Path) -> None:
    cfg, sd = plain_checkpoint(None)
    cfg = {**cfg, "attn_only": False, "gated_mlp": True, "d_mlp": 24, "normalization_type": "RMSPre"}
    for layer in range(2):
        m = f"blocks.{layer}.mlp."
        sd.update(
            {
                m + "W_in": torch.zeros(16, 24),
                m + "W_gate": torch.zeros(16, 24),
                m + "W_out": torch.zeros(24, 16),
            }
        )
        sd.update({m + "b_in": torch.zeros(24), m + "b_out": torch.zeros(16)})
    assert qs.load_model(save(tmp_path / "zero", cfg, sd), backend="bridge").cfg.gated_mlp
    sd["blocks.1.mlp.b_out"] = torch.ones(16)
    with pytest.raises(ValueError, match=r"non-zero blocks\.1\.mlp\.b_out"):
        qs.load_model(save(tmp_path / "ones", cfg, sd), backend="bridge")


@pytest.mark.parametrize("backend", BACKENDS)
def test_refactoring_rotary_attention_is_refused_up_front(tmp_path: Path, backend: str) -> None:
    cfg, sd = plain_checkpoint(None)
    del sd["pos_embed.W_pos"]
    cfg = {**cfg, "positional_embedding_type": "rotary", "rotary_adjacent_pairs": True}
    with pytest.raises(ValueError, match=r"refactor_factored_attn_matrices=True cannot be applied.*rotary"):
        qs.load_model(save(tmp_path / "ckpt", cfg, sd), backend=backend, refactor_factored_attn_matrices=True)


# ----------------------------------------------------------------------------- the real induction model
def _induction_losses(model: Any) -> tuple[float, float]:
    """Mean per-token loss (nats) on the first 16-token block and on its repeats: 64 sequences of a random
    block of ids in [0, 128) repeated to 85 tokens (seed 0)."""
    block = torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(0))
    toks = block.repeat(1, 6)[:, :85]
    logp = logits_of(model, toks).log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, toks[:, 1:, None]).squeeze(-1)  # nll[:, i] predicts token i + 1
    return float(nll[:, :15].mean()), float(nll[:, 15:].mean())


@pytest.mark.skipif(not INDUCTION.is_dir(), reason="needs ../shared/data/models/induction-2l beside the repo")
def test_induction_2l_predicts_repeated_tokens() -> None:
    model = qs.load_model(INDUCTION)
    assert backends.name_of(model) == TEST_BACKEND
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head) == (2, 4, 48, 12)
    first, repeats = _induction_losses(model)
    assert first == pytest.approx(6.1, abs=0.3) and repeats == pytest.approx(2.3, abs=0.3), (first, repeats)
    if backends.has_hooked_transformer():
        other = qs.load_model(INDUCTION, backend="bridge" if TEST_BACKEND == "hooked" else "hooked")
        assert _induction_losses(other) == pytest.approx((first, repeats), abs=1e-5)
