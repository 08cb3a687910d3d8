"""The ``TransformerBridge`` backend (TransformerLens 4, and 3.x beside ``HookedTransformer``).

A bridge wraps the Hugging Face model itself: its parameters are the Hugging Face modules' own
(``q_proj.weight`` ``[n_heads * d_head, d_model]``, GPT-2's fused ``c_attn`` split into ``q``/``k``/``v``
linears), and ``blocks[l].attn.W_Q`` ``[n_heads, d_model, d_head]`` is a *view* of the live parameter.
For grouped-query models ``attn.W_K``/``attn.W_V`` have one entry per key/value head (not repeated).
This module names those views as weight slots (so edits write the real parameters) and gathers
the fast path's weights from the same views. A TransformerLens-native checkpoint (:mod:`..native`) is
hosted in TransformerLens' own native model (``TransformerBridge.boot_native``, ``nn.Linear`` q/k/v/o
``[n_heads * d_head, d_model]``), with the same views.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..fastforward import FastModel, FastSpec, LayerWeights, Norm, activation
from ..native import CONFIG_FILE, HOOKED_CONFIG_DEFAULTS, WEIGHTS_FILE, NativeCheckpoint, check_state_dict
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
    "from_native",
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


# ------------------------------------------------------------------------- native checkpoints
#: ``HookedTransformerConfig`` fields the bridge's TransformerLens-native model computes as
#: ``HookedTransformer`` does (the values it cannot are refused by :func:`_native_reason`).
_NATIVE_HONOURED = frozenset(
    {
        "n_layers", "d_model", "d_head", "n_heads", "n_ctx", "d_vocab", "d_vocab_out", "d_mlp",
        "n_key_value_heads", "attn_only", "gated_mlp", "act_fn", "normalization_type", "eps", "final_rms",
        "positional_embedding_type", "rotary_dim", "rotary_base", "rotary_adjacent_pairs", "use_attn_scale",
        "attn_scale", "attn_scores_soft_cap", "output_logits_soft_cap", "default_prepend_bos", "model_name",
    }
)  # fmt: skip
#: Fields that change nothing the model computes: hook switches, bookkeeping, initialisation, placement,
#: and parameters of features whose switch must keep its default (window_size: use_local_attn, ...).
_NATIVE_INERT = frozenset(
    {
        "device", "dtype", "tokenizer_name", "tokenizer_prepends_bos", "seed", "init_mode", "init_weights",
        "initializer_range", "n_params", "from_checkpoint", "checkpoint_index", "checkpoint_label_type",
        "checkpoint_value", "original_architecture", "use_hook_tokens", "use_attn_result",
        "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "n_devices", "trust_remote_code",
        "ungroup_grouped_query_attention", "uses_rms_norm", "layer_norm_folding", "tie_word_embeddings",
        "train_seq_length", "window_size", "attn_types", "rotary_base_local", "experts_per_token",
        "norm_topk_prob", "quantization_method", "relative_attention_max_distance",
        "relative_attention_num_buckets", "decoder_start_token_id", "NTK_by_parts_low_freq_factor",
        "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor", "NTK_original_ctx_len", "yarn_factor",
        "yarn_attention_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_original_max_position_embeddings",
        "yarn_truncate", "yarn_global_attn_only",
    }
)  # fmt: skip
_NATIVE_NORMS = (None, "LN", "LNPre", "RMS", "RMSPre")
_NATIVE_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")


def _native_reason(cfg: dict[str, Any]) -> str | None:
    """Why the bridge's TransformerLens-native model would not compute what ``HookedTransformer`` computes
    (with the same weight processing) for the ``HookedTransformerConfig`` fields ``cfg``, or None."""
    unknown = sorted(set(cfg) - _NATIVE_HONOURED - _NATIVE_INERT - set(HOOKED_CONFIG_DEFAULTS))
    if unknown:
        return f"fields {unknown}, which this route does not know"
    for name, default in HOOKED_CONFIG_DEFAULTS.items():
        if name in cfg and name not in _NATIVE_HONOURED | _NATIVE_INERT and cfg[name] != default:
            return f"{name}={cfg[name]!r} (only the default {default!r} is supported)"
    norm = cfg.get("normalization_type", HOOKED_CONFIG_DEFAULTS["normalization_type"])
    pos = cfg.get("positional_embedding_type", "standard")
    act = cfg.get("act_fn", HOOKED_CONFIG_DEFAULTS["act_fn"])
    mlp = not cfg.get("attn_only", False)
    checks: list[tuple[bool, str]] = [
        (norm not in _NATIVE_NORMS, f"normalization_type={norm!r} (supported: {list(_NATIVE_NORMS)})"),
        (
            pos not in ("standard", "rotary"),
            f"positional_embedding_type={pos!r} (supported: standard, rotary)",
        ),
        (
            pos == "rotary" and not cfg.get("rotary_adjacent_pairs", False),
            "rotary positions with rotary_adjacent_pairs=False (it rotates adjacent pairs only)",
        ),
        (not cfg.get("use_attn_scale", True), "use_attn_scale=False"),
        (float(cfg.get("output_logits_soft_cap", -1.0)) > 0, "output-logit soft-capping"),
        (mlp and act not in _NATIVE_ACTIVATIONS, f"act_fn={act!r} (supported: {list(_NATIVE_ACTIVATIONS)})"),
        (
            mlp and bool(cfg.get("gated_mlp", False)) and norm == "LN",
            "a gated MLP after LayerNorm with a bias (HookedTransformer folds it differently)",
        ),
        (
            bool(cfg.get("final_rms", False)) and norm not in ("RMS", "RMSPre"),
            f"final_rms with normalization_type={norm!r}",
        ),
    ]
    return next((why for bad, why in checks if bad), None)


def _native_layout(cfg: Any) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """``{HookedTransformer weight name: (shape, bridge name, rearrangement)}`` of the native model of
    ``cfg`` (a ``TransformerBridgeConfig``, defaults resolved)."""
    n, dm, dh, dv = int(cfg.n_heads), int(cfg.d_model), int(cfg.d_head), int(cfg.d_vocab)
    n_kv = int(cfg.n_key_value_heads or n)
    dv_out = int(cfg.d_vocab_out) if int(getattr(cfg, "d_vocab_out", -1)) > 0 else dv
    gqa = "_" if cfg.n_key_value_heads is not None else ""  # HookedTransformer's grouped-query parameters
    norm = cfg.normalization_type
    layout: dict[str, tuple[tuple[int, ...], str, str]] = {"embed.W_E": ((dv, dm), "embed.weight", "")}
    if (cfg.positional_embedding_type or "standard") == "standard":
        layout["pos_embed.W_pos"] = ((int(cfg.n_ctx), dm), "pos_embed.weight", "")

    def add_norm(prefix: str) -> None:
        if norm in ("LN", "RMS"):
            layout[f"{prefix}.w"] = ((dm,), f"{prefix}.weight", "")
        if norm == "LN":
            layout[f"{prefix}.b"] = ((dm,), f"{prefix}.bias", "")

    for layer in range(int(cfg.n_layers)):
        a = f"blocks.{layer}.attn."
        add_norm(f"blocks.{layer}.ln1")
        layout[a + "W_Q"] = ((n, dm, dh), a + "q.weight", "heads_in")
        layout[a + "b_Q"] = ((n, dh), a + "q.bias", "heads_bias")
        for x in "KV":
            layout[f"{a}{gqa}W_{x}"] = ((n_kv, dm, dh), f"{a}{x.lower()}.weight", "heads_in")
            layout[f"{a}{gqa}b_{x}"] = ((n_kv, dh), f"{a}{x.lower()}.bias", "heads_bias")
        layout[a + "W_O"] = ((n, dh, dm), a + "o.weight", "heads_out")
        layout[a + "b_O"] = ((dm,), a + "o.bias", "")
        if not cfg.attn_only:
            add_norm(f"blocks.{layer}.ln2")
            m, d_mlp = f"blocks.{layer}.mlp.", int(cfg.d_mlp)
            layout[m + "W_in"] = ((dm, d_mlp), m + "in.weight", "T")
            layout[m + "W_out"] = ((d_mlp, dm), m + "out.weight", "T")
            # the native gated MLP has no biases: HookedTransformer's (zeros) are checked and dropped
            layout[m + "b_in"] = ((d_mlp,), "" if cfg.gated_mlp else m + "in.bias", "")
            layout[m + "b_out"] = ((dm,), "" if cfg.gated_mlp else m + "out.bias", "")
            if cfg.gated_mlp:
                layout[m + "W_gate"] = ((dm, d_mlp), m + "gate.weight", "T")
    add_norm("ln_final")
    layout["unembed.W_U"] = ((dm, dv_out), "unembed.weight", "T")
    layout["unembed.b_U"] = ((dv_out,), "unembed.bias", "")
    return layout


def _to_bridge(t: torch.Tensor, how: str) -> torch.Tensor:
    """A HookedTransformer tensor in the layout of the native model's ``nn.Linear``/``nn.Embedding``."""
    if how == "heads_in":  # [n, d_model, d_head] -> [n * d_head, d_model]
        return t.transpose(1, 2).reshape(-1, t.shape[1])
    if how == "heads_bias":  # [n, d_head] -> [n * d_head]
        return t.reshape(-1)
    if how == "heads_out":  # [n, d_head, d_model] -> [d_model, n * d_head]
        return t.reshape(-1, t.shape[2]).T
    return t.T if how == "T" else t


def from_native(
    checkpoint: NativeCheckpoint, tokenizer: Any, device: Any, dtype: torch.dtype, processing: dict[str, bool]
) -> Any:
    """A bridge around TransformerLens' own native model (``TransformerBridge.boot_native``) holding the
    weights of a native checkpoint (:mod:`..native`), in compatibility mode with ``processing``.

    Its forward equals ``HookedTransformer``'s on the same checkpoint and processing to float32 round-off
    (tests/test_native_checkpoint.py); configurations it would compute differently are refused.

    Raises:
        ValueError: a configuration the native model does not implement as ``HookedTransformer`` does
            (naming the field), a TransformerLens without ``boot_native``, or a weight that is missing,
            unexpected or of the wrong shape.
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    where = checkpoint.where()
    version = metadata.version("transformer-lens")
    instead = (
        "load it with backend='hooked'"
        if int(version.split(".")[0]) < 4
        else f"transformer-lens {version} has no HookedTransformer; load it with transformer-lens<4 and "
        "backend='hooked'"
    )
    if not hasattr(TransformerBridge, "boot_native"):
        raise ValueError(
            f"model directory {where}: TransformerBridge of transformer-lens {version} cannot host a "
            f"TransformerLens-native checkpoint (no TransformerBridge.boot_native); {instead}"
        )
    why = _native_reason(checkpoint.config)
    if why is not None:
        raise ValueError(
            f"model directory {where}: {CONFIG_FILE} describes a model the bridge's TransformerLens-native "
            f"model does not compute as HookedTransformer does: {why}; {instead}"
        )
    fields = {k: v for k, v in checkpoint.config.items() if k in _NATIVE_HONOURED}
    fields.pop("rotary_adjacent_pairs", None)  # always adjacent pairs there (checked above)
    try:
        cfg = TransformerBridgeConfig(
            **fields, architecture="TransformerLensNative", init_weights=False, dtype=dtype
        )
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(
            f"model directory {where}: {CONFIG_FILE} is not a valid configuration ({exc})"
        ) from exc
    layout = _native_layout(cfg)
    check_state_dict(checkpoint, {name: shape for name, (shape, _, _) in layout.items()})
    state_dict: dict[str, torch.Tensor] = {}
    for name, (_, target, how) in layout.items():
        value = checkpoint.state_dict[name]
        if not target:
            if bool(value.any()):
                raise ValueError(
                    f"model directory {where}: {WEIGHTS_FILE} has a non-zero {name}, a bias the bridge's "
                    f"native gated MLP does not have; {instead}"
                )
            continue
        state_dict[target] = _to_bridge(value, how).to(dtype)
    with torch.random.fork_rng(devices=[]):  # the native model's initial weights (overwritten) use the RNG
        bridge = TransformerBridge.boot_native(
            cfg, tokenizer=tokenizer, device=device, dtype=dtype, model_name=str(checkpoint.path)
        )
    bridge.load_state_dict(state_dict, strict=True)
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
