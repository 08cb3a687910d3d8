"""The ``TransformerBridge`` backend (TransformerLens 4, and 3.x beside ``HookedTransformer``).

A bridge wraps the Hugging Face model itself: its parameters are the Hugging Face modules' own
(``q_proj.weight`` ``[n_heads * d_head, d_model]``, GPT-2's fused ``c_attn`` split into ``q``/``k``/``v``
linears), and ``blocks[l].attn.W_Q`` ``[n_heads, d_model, d_head]`` is a *view* of the live parameter.
For grouped-query models ``attn.W_K``/``attn.W_V`` have one entry per key/value head (not repeated).
This module names those views as weight slots (so edits write the real parameters) and gathers
the fast path's weights from the same views.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..fastforward import FastModel, FastSpec, LayerWeights, Norm, activation
from ..slots import WeightSlot

__all__ = [
    "FAST_ARCHITECTURES",
    "architecture",
    "batch_reason",
    "has_qk_norm",
    "internal_hook_ids",
    "fast_model",
    "fast_model_reason",
    "from_hf_model",
    "from_official",
    "kv_parameter_name",
    "kv_weight",
    "needs_remote_code",
    "official_name",
    "query_head_weight",
    "weight_slots",
]

#: Hugging Face architectures the fast forward reproduces on a bridge (others use the bridge's forward).
FAST_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM")
#: TransformerLens name -> (the attention bridge's projection, the Hugging Face parameter behind it)
_ATTENTION_WEIGHTS = {
    "W_Q": ("q", "weight"),
    "W_K": ("k", "weight"),
    "W_V": ("v", "weight"),
    "W_O": ("o", "weight"),
    "b_Q": ("q", "bias"),
    "b_K": ("k", "bias"),
    "b_V": ("v", "bias"),
    "b_O": ("o", "bias"),
}


# ----------------------------------------------------------------------------- loading
def _compat(bridge: Any, processing: dict[str, bool]) -> Any:
    try:
        bridge.enable_compatibility_mode(disable_warnings=True, **processing)
    except RuntimeError as exc:  # e.g. fold_value_biases without fold_ln on grouped-query value biases
        on = sorted(k for k, v in processing.items() if v)
        raise ValueError(
            f"TransformerBridge could not apply the weight processing {on} to this model ({exc}); load it "
            "with fewer processing options (for example fold_value_biases=False), or backend='hooked'"
        ) from exc
    return bridge


def from_hf_model(
    path: Path, hf_model: Any, tokenizer: Any, device: Any, dtype: torch.dtype, processing: dict[str, bool]
) -> Any:
    """A bridge around ``hf_model`` (loaded from the local directory ``path``), in compatibility mode
    with ``processing`` (TransformerLens' weight processing, as ``HookedTransformer`` applies it)."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ValueError(
            f"model directory {str(path)!r} has no tokenizer files and no tokenizer= was given; the bridge "
            "backend needs a tokenizer (pass tokenizer=<tokenizer or directory>, or backend='hooked')"
        )
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    return _compat(bridge, processing)


def official_name(name: str) -> str:
    """The official Hugging Face name of a TransformerLens model name or alias; ValueError if unknown."""
    # transformer-lens 4 moved it to supported_models; 3.x keeps it with the HookedTransformer loaders
    resolve = _first_attribute(
        ("transformer_lens.supported_models", "get_official_model_name"),
        ("transformer_lens.loading_from_pretrained", "get_official_model_name"),
    )
    return str(resolve(name))


def needs_remote_code(official: str) -> bool:
    """Whether TransformerLens lists ``official`` as loading with ``trust_remote_code=True``."""
    prefixes = _first_attribute(
        ("transformer_lens.tools.model_registry", "REMOTE_CODE_MODEL_PREFIXES"),  # transformer-lens 4
        ("transformer_lens.loading_from_pretrained", "NEED_REMOTE_CODE_MODELS"),  # 3.x
    )
    return official.startswith(tuple(prefixes))


def _first_attribute(*places: tuple[str, str]) -> Any:
    """The first ``module.attribute`` of ``places`` that this TransformerLens has."""
    import importlib

    for module, attribute in places:
        try:
            value = getattr(importlib.import_module(module), attribute, None)
        except ImportError:
            continue
        if value is not None:
            return value
    raise ImportError(f"transformer-lens has none of {[f'{m}.{a}' for m, a in places]}")


def from_official(
    name: str,
    device: Any,
    dtype: torch.dtype,
    tokenizer: Any,
    processing: dict[str, bool],
    trust_remote_code: bool,
) -> Any:
    """``TransformerBridge.boot_transformers`` (the hub or its cache), in compatibility mode."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name, device=device, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code
    )
    return _compat(bridge, processing)


# ----------------------------------------------------------------------------- weights
def weight_slots(model: Any) -> dict[str, WeightSlot]:
    """The Hugging Face parameters under their own names, and the attention weights under their
    TransformerLens names (``blocks.{l}.attn.W_Q``, ...: views of those parameters)."""
    slots = {name: WeightSlot.identity(name, p) for name, p in model.named_parameters()}
    for layer, block in enumerate(model.blocks):
        for wname, (projection, attr) in _ATTENTION_WEIGHTS.items():
            view = getattr(block.attn, wname)
            owner = getattr(getattr(block.attn, projection).original_component, attr, None)
            if view is not None and isinstance(owner, torch.nn.Parameter):
                # the parameter the forward reads (GPT-2's q/k/v are views of the fused c_attn weight)
                name = f"blocks.{layer}.attn.{wname}"
                slots[name] = WeightSlot.of_view(name, owner, view)
    return slots


def kv_weight(model: Any, layer: int, name: str) -> torch.Tensor:
    """``W_K``/``W_V``/``b_K``/``b_V`` of ``layer``, one per key/value head (zeros for a missing bias)."""
    return _weight_or_zero_bias(model, layer, name, kv=True)


def query_head_weight(model: Any, layer: int, name: str) -> torch.Tensor:
    """An attention weight of ``layer`` with one entry per query head (keys/values repeated for GQA)."""
    value = _weight_or_zero_bias(model, layer, name, kv=name[-1] in "KV")
    if name[-1] in "KV":
        n_kv = value.shape[0]
        if n_kv != model.cfg.n_heads:
            value = value.repeat_interleave(model.cfg.n_heads // n_kv, dim=0)
    return value


def _weight_or_zero_bias(model: Any, layer: int, name: str, kv: bool) -> torch.Tensor:
    value = getattr(model.blocks[layer].attn, name)
    if value is None:  # a projection without bias (Llama): the bias is zero
        cfg = model.cfg
        n = (cfg.n_key_value_heads or cfg.n_heads) if kv else cfg.n_heads
        ref = model.blocks[layer].attn.W_Q
        shape = (cfg.d_model,) if name == "b_O" else (n, cfg.d_head)
        value = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    return value


def kv_parameter_name(model: Any, layer: int, name: str) -> str:
    """The slot name behind :func:`kv_weight`."""
    return f"blocks.{layer}.attn.{name}"


# ----------------------------------------------------------------------------- fast path
def architecture(model: Any) -> str | None:
    """The Hugging Face architecture the bridge wraps (``"LlamaForCausalLM"``, ...)."""
    arch = getattr(model.cfg, "architecture", None)
    if arch:
        return str(arch)
    archs = getattr(getattr(model.original_model, "config", None), "architectures", None) or []
    return str(archs[0]) if archs else type(model.original_model).__name__


def has_qk_norm(model: Any) -> bool:
    """Whether the wrapped attention normalises q and k per head (Qwen3, OLMo 2, ...: ``q_norm``)."""
    return any(
        getattr(block.attn.original_component, "q_norm", None) is not None
        or getattr(block.attn.original_component, "k_norm", None) is not None
        for block in model.blocks
    )


def _hf_config(model: Any) -> Any:
    return model.original_model.config


def fast_model_reason(model: Any) -> str | None:
    """Why the fast forward cannot reproduce this bridge's forward (hooks aside), or None."""
    arch = architecture(model)
    if arch not in FAST_ARCHITECTURES:
        return f"architecture {arch} (the fast path covers {', '.join(FAST_ARCHITECTURES)} on a bridge)"
    cfg, hf = model.cfg, _hf_config(model)
    if model.training:
        return "training mode (dropout)"
    if cfg.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {cfg.dtype}"
    if arch == "GPT2LMHeadModel":
        if not getattr(hf, "scale_attn_weights", True) or getattr(hf, "reorder_and_upcast_attn", False):
            return "GPT-2 attention scaling options"
        if getattr(hf, "add_cross_attention", False):
            return "cross-attention"
        if activation(str(hf.activation_function)) is None:
            return f"activation {hf.activation_function!r}"
    else:
        if getattr(hf, "mlp_bias", False):
            return "MLP biases"
        if activation(str(hf.hidden_act)) is None:
            return f"activation {hf.hidden_act!r}"
        if getattr(hf, "sliding_window", None):
            return "sliding-window attention"
    for name, mod in model.named_modules():
        if "forward" in vars(mod):
            return f"module {name or '<model>'} has a patched forward"
    return None


def internal_hook_ids(model: Any) -> set[int]:
    """Ids of the hooks the libraries install themselves, which observe and change nothing: the bridge
    blocks' capture hooks and transformers' output-capturing hooks (both wired on a first forward).
    Every hook on a TransformerLens hook point counts as a user's hook."""
    from transformer_lens.hook_points import HookPoint

    ids = {handle.id for module in model.modules() for handle in getattr(module, "_capture_hook_handles", ())}
    for module in model.modules():
        if isinstance(module, HookPoint):
            continue
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            ids |= {
                key
                for key, fn in hooks.items()
                if str(getattr(fn, "__module__", "")).startswith(("transformers.", "transformer_lens."))
            }
    return ids


def batch_reason(model: Any, tokens: torch.Tensor) -> str | None:
    """Why this batch needs the bridge's forward (leading pad tokens of a left-padding tokenizer)."""
    tok = model.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    if pad is None or getattr(tok, "padding_side", "right") != "left":
        return None
    return "left padding" if bool((tokens[:, 0] == int(pad)).any()) else None


def _linear(bridge_linear: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [d_in, d_out], bias [d_out] or None)``: views of a Linear's or GPT-2 Conv1D's parameters."""
    module = bridge_linear.original_component
    w = module.weight.detach()
    if isinstance(module, torch.nn.Linear):
        w = w.T
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return w, b


def _norm(bridge_norm: Any) -> Norm:
    module = bridge_norm.original_component
    eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))
    w = module.weight.detach()
    if getattr(module, "bias", None) is not None:
        return Norm("LN", w, module.bias.detach(), eps)
    if isinstance(module, torch.nn.LayerNorm):
        return Norm("LN", w, None, eps)
    return Norm("RMS", w, None, eps)


def _zeros_like_bias(t: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return t.detach() if t is not None else torch.zeros(shape, dtype=like.dtype, device=like.device)


def _rotary(model: Any, n_positions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face rotary tables ``(cos, sin)`` ``[n_positions, d_head]`` (attention scaling included)."""
    rotary = model.original_model.model.rotary_emb
    positions = torch.arange(n_positions, device=like.device)[None]
    cos, sin = rotary(like.new_zeros(1, n_positions, like.shape[-1]), positions)
    return cos[0].to(like.dtype), sin[0].to(like.dtype)


def fast_model(model: Any, n_positions: int) -> FastModel:
    """Detached views of the parameters the fast forward reads, for up to ``n_positions`` positions."""
    cfg, hf = model.cfg, _hf_config(model)
    gpt2 = architecture(model) == "GPT2LMHeadModel"
    n_kv = int(cfg.n_key_value_heads or cfg.n_heads)
    W_E = model.embed.original_component.weight.detach()
    cos = sin = None
    if not gpt2:
        cos, sin = _rotary(model, n_positions, W_E)
    layers = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        W_Q, W_K, W_V = attn.W_Q.detach(), attn.W_K.detach(), attn.W_V.detach()
        W_O = attn.W_O.detach()
        if gpt2:
            scale = float(cfg.d_head) ** -0.5
            if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
                scale /= i + 1
            act_name = str(hf.activation_function)
            w_gate = None
        else:
            scale = float(attn.original_component.scaling)
            act_name = str(hf.hidden_act)
            w_gate, _ = _linear(mlp.gate)
        w_in, b_in = _linear(getattr(mlp, "in"))
        w_out, b_out = _linear(mlp.out)
        layers.append(
            LayerWeights(
                ln1=_norm(block.ln1),
                ln2=_norm(block.ln2),
                W_Q=W_Q,
                b_Q=_zeros_like_bias(attn.b_Q, (cfg.n_heads, cfg.d_head), W_Q),
                W_K=W_K,
                b_K=_zeros_like_bias(attn.b_K, (n_kv, cfg.d_head), W_Q),
                W_V=W_V,
                b_V=_zeros_like_bias(attn.b_V, (n_kv, cfg.d_head), W_Q),
                w_o=W_O.reshape(cfg.n_heads * cfg.d_head, cfg.d_model),
                b_o=_zeros_like_bias(attn.b_O, (cfg.d_model,), W_Q),
                scale=scale,
                rot_cos=cos,
                rot_sin=sin,
                w_gate=w_gate,
                w_in=w_in,
                b_in=_zeros_like_bias(b_in, (w_in.shape[1],), W_Q),
                w_out=w_out,
                b_out=_zeros_like_bias(b_out, (cfg.d_model,), W_Q),
                act=activation(act_name),
            )
        )
    unembed = model.unembed.original_component
    b_U = unembed.bias.detach() if getattr(unembed, "bias", None) is not None else None
    spec = FastSpec(
        n_heads=int(cfg.n_heads),
        n_kv_heads=n_kv,
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        dtype=W_E.dtype,
    )
    return FastModel(
        spec=spec,
        W_E=W_E,
        W_pos=model.pos_embed.original_component.weight.detach() if gpt2 else None,
        layers=layers,
        ln_final=_norm(model.ln_final),
        W_U=unembed.weight.detach().T,
        b_U=b_U if b_U is not None and bool(b_U.any()) else None,
    )
