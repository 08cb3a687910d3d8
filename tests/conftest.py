"""Shared fixtures: tiny HookedTransformers built from configs, and the optional ../shared data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
STORIES = SHARED_DATA / "models" / "stories260K"
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_val.txt"
WIKITEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"

requires_shared = pytest.mark.skipif(
    not STORIES.is_dir(), reason="needs ../shared/data (real offline model and data) beside the repo"
)


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
) -> HookedTransformer:
    """A tiny random HookedTransformer. ``kind``: "mha" (GPT-2 style, LN, learned positions) or
    "gqa" (Llama style: RMSNorm, rotary, gated SiLU MLP, grouped-query attention)."""
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
def mha_model() -> HookedTransformer:
    return make_model("mha")


@pytest.fixture
def gqa_model() -> HookedTransformer:
    return make_model("gqa", n_heads=4, n_kv_heads=2)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))


def param_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_params_equal(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), snap[k]), f"parameter {k} changed"
