"""The ``HookedTransformer`` backend (TransformerLens 3.x): loading, weight slots, fast-path weights.

A ``HookedTransformer`` keeps its weights in TransformerLens layout: every attention weight is a
parameter (``blocks.{l}.attn.W_Q`` ``[n_heads, d_model, d_head]``; for grouped-query attention the
key/value parameters ``_W_K``/``_W_V`` ``[n_kv_heads, d_model, d_head]``, which ``attn.W_K``/``attn.W_V``
repeat per query head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fastforward import NO_NORM, FastModel, FastSpec, LayerWeights, Norm, activation
from ..native import CONFIG_FILE, NativeCheckpoint, check_state_dict
from ..slots import WeightSlot

__all__ = [
    "architecture",
    "batch_reason",
    "has_qk_norm",
    "internal_hook_ids",
    "fast_model",
    "fast_model_reason",
    "from_hf_model",
    "from_native",
    "from_official",
    "kv_parameter_name",
    "kv_weight",
    "needs_remote_code",
    "official_name",
    "query_head_weight",
    "weight_slots",
]

_QK_NORM_ARCHS = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


# ----------------------------------------------------------------------------- loading
def from_hf_model(
    path: Path, hf_model: Any, tokenizer: Any, device: Any, dtype: torch.dtype, processing: dict[str, bool]
) -> Any:
    """A HookedTransformer with the weights of ``hf_model`` (loaded from the local directory ``path``)."""
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer

    cfg = tl_loading.get_pretrained_model_config(
        str(path), fold_ln=processing["fold_ln"], device=device, dtype=dtype
    )
    state_dict = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **processing)
    model.move_model_modules_to_device()
    return model


def from_native(
    checkpoint: NativeCheckpoint, tokenizer: Any, device: Any, dtype: torch.dtype, processing: dict[str, bool]
) -> Any:
    """A HookedTransformer of a native checkpoint (:mod:`..native`): ``HookedTransformerConfig`` of the
    file's fields, the state dict checked against the model's parameters (names and shapes), then
    ``load_and_process_state_dict`` with ``processing``.

    Raises:
        ValueError: the fields are not a valid ``HookedTransformerConfig``; a weight is missing, an entry
            is not the model's, or a shape differs.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields: dict[str, Any] = {**checkpoint.config, "dtype": dtype, "init_weights": False}
    if device is not None:
        fields["device"] = str(device)
    try:
        cfg = HookedTransformerConfig(**fields)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(
            f"model directory {checkpoint.where()}: {CONFIG_FILE} is not a valid HookedTransformerConfig ({exc})"
        ) from exc
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    buffers = {name: "a buffer rebuilt from the config" for name, _ in model.named_buffers()}
    check_state_dict(checkpoint, {n: tuple(p.shape) for n, p in model.named_parameters()}, buffers)
    state_dict = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in checkpoint.state_dict.items()
        if k not in buffers
    }
    if cfg.normalization_type is None:  # nothing to fold: TransformerLens would skip it, with a warning
        processing = {**processing, "fold_ln": False}
    model.load_and_process_state_dict(state_dict, **processing)
    model.move_model_modules_to_device()
    return model


def official_name(name: str) -> str:
    """TransformerLens' official name of ``name`` (an alias such as ``"gpt2-small"``); ValueError if unknown."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    return str(get_official_model_name(name))


def needs_remote_code(official: str) -> bool:
    """Whether TransformerLens loads ``official`` with ``trust_remote_code=True``."""
    import transformer_lens.loading_from_pretrained as tl_loading

    return official.startswith(tuple(getattr(tl_loading, "NEED_REMOTE_CODE_MODELS", ())))


def from_official(
    name: str,
    device: Any,
    dtype: torch.dtype,
    tokenizer: Any,
    processing: dict[str, bool],
    trust_remote_code: bool,
    checkpoint_value: int | None = None,
) -> Any:
    """``HookedTransformer.from_pretrained`` (the hub or its cache); ``checkpoint_value``: a training step."""
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained(
        name,
        checkpoint_value=checkpoint_value,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        **processing,  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------- weights
def weight_slots(model: Any) -> dict[str, WeightSlot]:
    """Every parameter under its own name (the TransformerLens names)."""
    return {name: WeightSlot.identity(name, p) for name, p in model.named_parameters()}


def kv_weight(model: Any, layer: int, name: str) -> torch.Tensor:
    """``W_K``/``W_V``/``b_K``/``b_V`` of ``layer``, one per key/value head (the parameter, not repeated)."""
    attn = model.blocks[layer].attn
    return getattr(attn, "_" + name) if hasattr(attn, "_" + name) else getattr(attn, name)


def query_head_weight(model: Any, layer: int, name: str) -> torch.Tensor:
    """An attention weight of ``layer`` with one entry per query head (keys/values repeated for GQA)."""
    return getattr(model.blocks[layer].attn, name)


def kv_parameter_name(model: Any, layer: int, name: str) -> str:
    """The parameter name behind :func:`kv_weight`."""
    attn = model.blocks[layer].attn
    prefix = f"blocks.{layer}.attn."
    return prefix + ("_" + name if hasattr(attn, "_" + name) else name)


def architecture(model: Any) -> str | None:
    """The Hugging Face architecture the model was converted from (``cfg.original_architecture``)."""
    return getattr(model.cfg, "original_architecture", None)


def has_qk_norm(model: Any) -> bool:
    """Whether q and k are normalised per head (``use_qk_norm``, OLMo 2/3, OLMoE)."""
    return bool(getattr(model.cfg, "use_qk_norm", False)) or architecture(model) in _QK_NORM_ARCHS


# ----------------------------------------------------------------------------- fast path
def _cfg_reason(model: Any) -> str | None:
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    checks: list[tuple[bool, str]] = [
        (
            cfg.original_architecture in POST_NORM_ARCHITECTURES,
            f"post-norm architecture {cfg.original_architecture}",
        ),
        (cfg.original_architecture in _QK_NORM_ARCHS, f"QK-norm architecture {cfg.original_architecture}"),
        (
            cfg.positional_embedding_type not in ("standard", "rotary"),
            f"positional_embedding_type={cfg.positional_embedding_type!r}",
        ),
        (
            cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre", None),
            f"normalization_type={cfg.normalization_type!r}",
        ),
        (bool(cfg.use_normalization_before_and_after), "use_normalization_before_and_after"),
        (bool(cfg.use_local_attn), "local (windowed) attention"),
        (cfg.attention_dir != "causal", f"attention_dir={cfg.attention_dir!r}"),
        (softcap_enabled(cfg.attn_scores_soft_cap), "attention-score soft-capping"),
        (softcap_enabled(cfg.output_logits_soft_cap), "output-logit soft-capping"),
        (bool(cfg.use_qk_norm), "use_qk_norm"),
        (cfg.clip_qkv is not None, "clip_qkv"),
        (bool(cfg.use_logn_attn), "use_logn_attn"),
        (bool(cfg.use_attention_sinks), "attention sinks"),
        (bool(cfg.use_dynamic_ntk_rope), "dynamic NTK rotary"),
        (bool(cfg.num_experts), "mixture of experts"),
        (bool(cfg.load_in_4bit), "4-bit weights"),
        (cfg.n_devices != 1, f"n_devices={cfg.n_devices}"),
        (bool(cfg.use_attn_result), "use_attn_result"),
        (bool(cfg.use_split_qkv_input) or bool(cfg.use_attn_in), "split/per-head attention inputs"),
        (bool(cfg.post_embedding_ln), "post_embedding_ln"),
        (cfg.is_layer_norm_activation(), f"layer-norm activation {cfg.act_fn!r}"),
        (
            cfg.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
            f"dtype {cfg.dtype}",
        ),
    ]
    for bad, why in checks:
        if bad:
            return why
    return None


def _module_reason(model: Any) -> str | None:
    from transformer_lens.components import (
        Attention,
        Embed,
        GroupedQueryAttention,
        LayerNorm,
        LayerNormPre,
        PosEmbed,
        RMSNorm,
        RMSNormPre,
        TransformerBlock,
        Unembed,
    )
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP

    norms = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)
    if type(model.embed) is not Embed:
        return f"embed is {type(model.embed).__name__}"
    if model.cfg.positional_embedding_type == "standard" and type(model.pos_embed) is not PosEmbed:
        return f"pos_embed is {type(model.pos_embed).__name__}"
    if type(model.unembed) is not Unembed:
        return f"unembed is {type(model.unembed).__name__}"
    norm_ok = (
        (lambda m: type(m) in norms) if model.cfg.normalization_type else (lambda m: type(m) is nn.Identity)
    )
    if model.cfg.normalization_type is not None and not norm_ok(model.ln_final):
        return f"ln_final is {type(model.ln_final).__name__}"
    for i, block in enumerate(model.blocks):
        if type(block) is not TransformerBlock:
            return f"block {i} is {type(block).__name__}"
        if type(block.attn) not in (Attention, GroupedQueryAttention) or block.attn.attn_type != "global":
            return f"block {i} attention is {type(block.attn).__name__} ({block.attn.attn_type})"
        if getattr(block.attn, "_attention_dir_override", None) not in (None, "causal"):
            return f"block {i} attention direction override"
        if not norm_ok(block.ln1) or (not model.cfg.attn_only and not norm_ok(block.ln2)):
            return f"block {i} normalization is {type(block.ln1).__name__}"
        if not model.cfg.attn_only and type(block.mlp) not in (MLP, GatedMLP):
            return f"block {i} mlp is {type(block.mlp).__name__}"
    for name, mod in model.named_modules():
        if "forward" in vars(mod):
            return f"module {name or '<model>'} has a patched forward"
    return None


def fast_model_reason(model: Any) -> str | None:
    """Why the fast forward cannot reproduce this HookedTransformer's forward (hooks aside), or None."""
    return _cfg_reason(model) or _module_reason(model)


def internal_hook_ids(model: Any) -> set[int]:
    """A HookedTransformer installs no hooks of its own."""
    return set()


def batch_reason(model: Any, tokens: torch.Tensor) -> str | None:
    """Why this batch needs TransformerLens' forward: a left-padding mask, or rotary tables too short."""
    tok = model.tokenizer
    if tok is not None and getattr(tok, "padding_side", "right") == "left":
        from transformer_lens import utils

        if not bool(utils.get_attention_mask(tok, tokens, model.cfg.default_prepend_bos).all()):
            return "left padding"
    if model.cfg.positional_embedding_type == "rotary" and any(
        b.attn.rotary_cos.shape[0] < tokens.shape[1] for b in model.blocks
    ):
        return "context longer than the rotary tables"  # TransformerLens extends them on the fly
    return None


def _norm(module: Any, kind: str | None) -> Norm:
    if kind is None:
        return NO_NORM
    w = module.w.detach() if kind in ("LN", "RMS") else None
    b = module.b.detach() if kind == "LN" else None
    return Norm(kind, w, b, float(module.eps))


def fast_model(model: Any, n_positions: int) -> FastModel:
    """Detached views of the parameters the fast forward reads (nothing copied or cached).

    ``n_positions`` is the context of the batch (the rotary tables are the model's own buffers).
    """
    from transformer_lens.components import GroupedQueryAttention
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    cfg = model.cfg
    layers = []
    rot = cfg.positional_embedding_type == "rotary"
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, GroupedQueryAttention):
            W_K, W_V, b_K, b_V = attn._W_K, attn._W_V, attn._b_K, attn._b_V
        else:
            W_K, W_V, b_K, b_V = attn.W_K, attn.W_V, attn.b_K, attn.b_V
        w_gate = w_in = b_in = w_out = b_out = act = None
        if not cfg.attn_only:
            mlp: Any = block.mlp
            w_gate = mlp.W_gate.detach() if isinstance(mlp, GatedMLP) else None
            w_in, b_in = mlp.W_in.detach(), mlp.b_in.detach()
            w_out, b_out = mlp.W_out.detach(), mlp.b_out.detach()
            act = activation(cfg.act_fn) or mlp.act_fn  # TransformerLens' own: exact by construction
        layers.append(
            LayerWeights(
                ln1=_norm(block.ln1, cfg.normalization_type),
                ln2=None if cfg.attn_only else _norm(block.ln2, cfg.normalization_type),
                W_Q=attn.W_Q.detach(),
                b_Q=attn.b_Q.detach(),
                W_K=W_K.detach(),
                b_K=b_K.detach(),
                W_V=W_V.detach(),
                b_V=b_V.detach(),
                w_o=attn.W_O.detach().reshape(cfg.n_heads * cfg.d_head, cfg.d_model),
                b_o=attn.b_O.detach(),
                scale=1.0 / float(attn.attn_scale),
                rot_cos=attn.rotary_cos if rot else None,
                rot_sin=attn.rotary_sin if rot else None,
                w_gate=w_gate,
                w_in=w_in,
                b_in=b_in,
                w_out=w_out,
                b_out=b_out,
                act=act,
            )
        )
    b_U = model.unembed.b_U.detach()
    spec = FastSpec(
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
        d_head=cfg.d_head,
        d_model=cfg.d_model,
        dtype=cfg.dtype,
        attn_only=bool(cfg.attn_only),
        parallel_attn_mlp=bool(cfg.parallel_attn_mlp),
        rotary_adjacent_pairs=bool(cfg.rotary_adjacent_pairs),
    )
    del n_positions
    return FastModel(
        spec=spec,
        W_E=model.embed.W_E.detach(),
        W_pos=model.pos_embed.W_pos.detach() if cfg.positional_embedding_type == "standard" else None,
        layers=layers,
        ln_final=_norm(model.ln_final, cfg.normalization_type) if cfg.normalization_type else NO_NORM,
        W_U=model.unembed.W_U.detach(),
        b_U=b_U if bool(b_U.any()) else None,
    )
