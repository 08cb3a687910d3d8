"""Shared fixtures: tiny random models built from configs, and the optional ../shared data.

``make_model`` builds a ``HookedTransformer`` or a ``TransformerBridge`` (around a tiny Hugging Face
GPT-2 or Llama model): whatever ``load_model(backend="auto")`` gives, i.e. ``HookedTransformer`` on
transformer-lens 3.x and the bridge on 4.x, or the one ``QK_SUBSPACE_BACKEND=hooked|bridge`` names
(``QK_SUBSPACE_BACKEND=bridge pytest`` runs the whole suite on the bridge).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from qk_subspace.model import backends

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
STORIES = SHARED_DATA / "models" / "stories260K"
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_val.txt"
WIKITEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"

requires_shared = pytest.mark.skipif(
    not STORIES.is_dir(), reason="needs ../shared/data (real offline model and data) beside the repo"
)


#: The backend the tests build and load models on (``load_model``'s "auto").
TEST_BACKEND = backends.resolve("auto")
HOOKED = TEST_BACKEND == "hooked"
requires_hooked = pytest.mark.skipif(
    not backends.has_hooked_transformer(), reason="needs HookedTransformer (transformer-lens 3.x)"
)


def load_kwargs() -> dict[str, Any]:
    """What ``load_model`` needs for a saved tiny checkpoint without tokenizer files: nothing on
    ``HookedTransformer``; a tokenizer on the bridge (the embedded model's, whose ids cover tiny vocabularies)."""
    if HOOKED:
        return {}
    from qk_subspace.model.embedded import EMBEDDED_DIR

    return {"tokenizer": str(EMBEDDED_DIR)}


def make_model(
    kind: str = "mha",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_head: int = 8,
    n_kv_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    n_ctx: int = 32,
    d_vocab: int = 50,
    backend: str | None = None,
) -> Any:
    """A tiny random model. ``kind``: "mha" (GPT-2 style, LN, learned positions) or "gqa" (Llama style:
    RMSNorm, rotary, gated SiLU MLP, grouped-query attention). ``backend``: "hooked" or "bridge"
    (default :data:`TEST_BACKEND`). Attention biases are random (non-zero) on both."""
    which = backends.resolve(backend or TEST_BACKEND)
    if which == "bridge":
        shape = dict(
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, n_kv_heads=n_kv_heads
        )
        return make_bridge(kind, dtype, seed=seed, n_ctx=n_ctx, d_vocab=d_vocab, **shape)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=2 * d_model,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        seed=seed,
        dtype=dtype,
        device="cpu",
    )
    if kind == "mha":
        cfg = HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN", **common)
    elif kind == "gqa":
        cfg = HookedTransformerConfig(
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=d_head,
            gated_mlp=True,
            n_key_value_heads=n_kv_heads or max(1, n_heads // 2),
            **common,
        )
    else:
        raise ValueError(kind)
    model = HookedTransformer(cfg)
    # TransformerLens initialises biases to zero; give them values so bias handling is tested.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("b_Q", "b_K", "b_V", "b_O", "_b_K", "_b_V"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    return model


@functools.cache
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from qk_subspace.model.embedded import EMBEDDED_DIR

    return AutoTokenizer.from_pretrained(str(EMBEDDED_DIR))


def tiny_hf_model(
    kind: str = "mha",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_head: int = 8,
    n_kv_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    n_ctx: int = 32,
    d_vocab: int = 50,
) -> Any:
    """A tiny random Hugging Face GPT-2 ("mha") or Llama ("gqa", attention biases on) model, weights at
    TransformerLens' init scale, attention biases random. A multi-head shape GPT-2 cannot have
    (``d_model != n_heads * d_head``) is a Llama model with as many key/value heads as query heads."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    std = 0.8 / d_model**0.5  # HookedTransformer's initializer range
    if kind == "mha" and d_model != n_heads * d_head:
        kind, n_kv_heads = "gqa", n_heads
    if kind == "mha":
        config: Any = GPT2Config(
            n_layer=n_layers, n_head=n_heads, n_embd=d_model, n_inner=2 * d_model, n_positions=n_ctx,
            vocab_size=d_vocab, activation_function="gelu_new", initializer_range=std,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        )  # fmt: skip
        cls: Any = GPT2LMHeadModel
    elif kind == "gqa":
        config = LlamaConfig(
            vocab_size=d_vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_kv_heads or max(1, n_heads // 2), head_dim=d_head,
            max_position_embeddings=n_ctx, attention_bias=True, initializer_range=std, tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        )  # fmt: skip
        cls = LlamaForCausalLM
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = cls(config).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") and ("attn" in name or "proj" in name) and "mlp" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return hf


def make_bridge(kind: str = "mha", dtype: torch.dtype = torch.float32, **shape: Any) -> Any:
    """A tiny random ``TransformerBridge`` (compatibility mode, no weight processing) around
    :func:`tiny_hf_model` (same arguments)."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = tiny_hf_model(kind, dtype=dtype, **shape)
    with tempfile.TemporaryDirectory(prefix="qk_subspace_tiny_") as folder:  # the bridge reads config.json
        hf.config.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=_tokenizer(), dtype=dtype)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    for module in bridge.modules():  # Hugging Face's RMSNorm computes in float32 even in a float64 model
        if getattr(module, "use_native_layernorm_autograd", False):
            module.use_native_layernorm_autograd = False
    return bridge.eval()


@pytest.fixture
def stories260k() -> tuple[Path, Path]:
    """``(model directory, TinyStories text)`` of the real offline data in ``../shared`` (skips without it)."""
    if not STORIES.is_dir():
        pytest.skip("needs ../shared/data (real offline model and data) beside the repo")
    return STORIES, TINYSTORIES


def is_html_figure(path: Path) -> bool:
    """``path`` is a plotly HTML figure whose plotly.js is the one file beside it (not embedded)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    return (
        "Plotly.newPlot" in text and '"plotly.min.js"' in text and (path.parent / "plotly.min.js").is_file()
    )


def load_tool(name: str) -> Any:
    """A script of ``tools/`` as a module (the tools are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def mha_model() -> Any:
    return make_model("mha")


@pytest.fixture
def gqa_model() -> Any:
    return make_model("gqa", n_heads=4, n_kv_heads=2)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))


def float32_attention(model: Any) -> bool:
    """Whether the model's attention softmax runs in float32 whatever the model dtype: a bridge around a
    Hugging Face Llama-family model (Hugging Face's eager attention, which the bridge reproduces)."""
    if backends.name_of(model) != "bridge":
        return False
    return backends.of(model).architecture(model) != "GPT2LMHeadModel"


def tolerance(model: Any, exact: float, float32: float = 1e-6) -> float:
    """``exact`` for a model that computes in its own dtype; ``float32`` round-off otherwise."""
    return max(exact, float32) if float32_attention(model) else exact


def param_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and, on a bridge, of the TransformerLens-named attention weights."""
    from qk_subspace.model.weights import named_weights

    return {k: v.detach().clone() for k, v in named_weights(model).items()}


def assert_params_equal(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Every parameter (and TransformerLens-named weight) bit for bit as in ``snap``."""
    from qk_subspace.model.weights import named_weights

    current = named_weights(model)
    assert set(current) == set(snap)
    for k, v in current.items():
        assert torch.equal(v.detach(), snap[k]), f"parameter {k} changed"


def changed_weights(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> set[str]:
    """TransformerLens names of the attention weights (``blocks.{l}.attn.W_Q``, ...) that differ from
    ``snap``, and names of the other parameters that differ (on a bridge, parameters that store an
    attention weight are represented by the weight's TransformerLens name)."""
    from qk_subspace.model.weights import named_weights, weight_slots

    slots = weight_slots(model)
    attention = {n for n in slots if ".attn." in n and n.split(".")[-1] in ATTENTION_NAMES}

    def storage(name: str) -> int:
        return slots[name].parameter.untyped_storage().data_ptr()

    behind = {storage(n) for n in attention}
    current = named_weights(model)
    return {
        k
        for k, v in current.items()
        if (k in attention or storage(k) not in behind) and not torch.equal(v.detach(), snap[k])
    }


#: The attention weights' TransformerLens names (last component).
ATTENTION_NAMES = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "_W_K", "_W_V", "_b_K", "_b_V")
