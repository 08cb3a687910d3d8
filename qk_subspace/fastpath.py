"""A fast, hook-free forward of a HookedTransformer for next-token NLL (used by :func:`perplexity`).

TransformerLens' forward is written for inspection: every block materialises the attention
scores and pattern ``[batch, n_heads, pos, pos]`` (so that ``hook_attn_scores``/``hook_pattern``
can see them), re-arranges and copies ``W_Q/W_K/W_V/W_O/W_U`` on every call, and the caller then
builds full-vocabulary log-probabilities ``[batch, pos, d_vocab]``. This module computes the same
function from the *same parameter tensors* of the same model (edited ``W_Q`` in place included):

* Q, K and V in one matmul with a cached fused weight ``[d_model, (n_heads + 2 n_kv) d_head]``;
* attention through :func:`torch.nn.functional.scaled_dot_product_attention` (``is_causal``),
  which never forms the ``pos x pos`` pattern;
* fused ``F.layer_norm`` / ``F.rms_norm`` / ``F.gelu`` kernels;
* the unembedding and cross-entropy in row blocks (:data:`CE_BLOCK_ROWS` positions at a time), so
  the ``[batch, pos, d_vocab]`` logits are never materialised.

The cached fused weights are keyed on :func:`qk_subspace.injection.weights_version` (bumped by
every qk_subspace edit and restore) *and* on every parameter's storage pointer and in-place
version counter, so weights changed by any means (``inject_qk``, ``load_state_dict``, an
optimiser step) are always seen. The cache holds one extra copy of the Q/K/V weights (85 MB for
GPT-2 small in float32) on the model until :func:`clear_cache`; the other weights are used in place.

Whenever the model is outside what this module reproduces exactly, :func:`unsupported_reason`
names the reason and callers use TransformerLens' own forward instead -- in particular whenever
*any* hook is attached (a hook on ``hook_pattern`` must see the pattern; a hook anywhere else may
change the result), for local/windowed attention, soft-capping, ALiBi/shortformer/relative
positions, QK-norm, attention sinks, MoE, post-norm blocks, 4-bit weights, multi-device models,
``use_attn_result``/split inputs, or subclassed components. Supported: GPT-2 (LN, learned
positions), GPT-NeoX/Pythia (parallel attention + MLP, partial rotary), Llama/Mistral/Qwen2-style
(RMSNorm, rotary, grouped-query attention, gated MLP), with ``fold_ln`` (LNPre/RMSPre) or not.

Switch it off globally with ``QK_SUBSPACE_FAST=0`` in the environment or
:func:`set_fast_path_enabled` (``False``), or per call with ``perplexity(..., fast=False)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import HookedTransformer
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
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from .injection import weights_version

__all__ = [
    "CE_BLOCK_ROWS",
    "FAST_ENV",
    "attached_hooks",
    "clear_cache",
    "fast_chunk_nll",
    "fast_path_enabled",
    "fast_token_nll",
    "flops_per_token",
    "set_fast_path_enabled",
    "unsupported_reason",
]

#: Environment variable: ``0``/``false``/``off`` disables the fast path by default.
FAST_ENV = "QK_SUBSPACE_FAST"
#: Positions per block of the fused unembedding + cross-entropy.
CE_BLOCK_ROWS = 512

_CACHE_ATTR = "_qk_subspace_fast_cache"
_enabled_override: bool | None = None

_QK_NORM_ARCHS = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
_NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)


def fast_path_enabled() -> bool:
    """Whether :func:`perplexity` uses the fast path by default (``fast=None``)."""
    if _enabled_override is not None:
        return _enabled_override
    return os.environ.get(FAST_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def set_fast_path_enabled(enabled: bool | None) -> None:
    """Enable/disable the fast path globally; ``None`` returns to the ``QK_SUBSPACE_FAST`` env default."""
    global _enabled_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _enabled_override = enabled


def attached_hooks(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` with forward/backward hooks (incl. TransformerLens hook points)."""
    names = []
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
            names.append(name or "<model>")
    return names


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return bool(
        _m._global_forward_hooks
        or _m._global_forward_pre_hooks
        or _m._global_backward_hooks
        or getattr(_m, "_global_backward_pre_hooks", None)
    )


def _cfg_reason(model: HookedTransformer) -> str | None:
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


def _module_reason(model: HookedTransformer) -> str | None:
    if type(model.embed) is not Embed:
        return f"embed is {type(model.embed).__name__}"
    if model.cfg.positional_embedding_type == "standard" and type(model.pos_embed) is not PosEmbed:
        return f"pos_embed is {type(model.pos_embed).__name__}"
    if type(model.unembed) is not Unembed:
        return f"unembed is {type(model.unembed).__name__}"
    norm_ok = (
        (lambda m: type(m) in _NORMS) if model.cfg.normalization_type else (lambda m: type(m) is nn.Identity)
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


def unsupported_reason(model: HookedTransformer) -> str | None:
    """Why the fast path cannot reproduce ``model``'s standard forward, or ``None`` if it can.

    Checks the configuration, the component classes, patched ``forward`` methods and attached
    hooks (any hook on any module, or a global module hook, disables the fast path).
    """
    if not isinstance(model, HookedTransformer):
        return f"not a HookedTransformer ({type(model).__name__})"
    why = _cfg_reason(model) or _module_reason(model)
    if why:
        return why
    hooks = attached_hooks(model)
    if hooks:
        return f"hooks attached to {hooks[:5]}{' ...' if len(hooks) > 5 else ''}"
    if _global_hooks():
        return "global nn.Module hooks are registered"
    return None


# ----------------------------------------------------------------------------- cached weights
@dataclass
class _Norm:
    kind: str  # "LN", "LNPre", "RMS", "RMSPre", "none"
    w: torch.Tensor | None
    b: torch.Tensor | None
    eps: float


@dataclass
class _LayerWeights:
    ln1: _Norm
    ln2: _Norm | None
    w_qkv: torch.Tensor  # [d_model, (n_heads + 2 n_kv) d_head]
    b_qkv: torch.Tensor  # [(n_heads + 2 n_kv) d_head]
    w_o: torch.Tensor  # [n_heads d_head, d_model]
    b_o: torch.Tensor  # [d_model]
    scale: float
    rot_cos: torch.Tensor | None  # [n_rot_ctx, rotary_dim]
    rot_sin: torch.Tensor | None
    w_in: torch.Tensor | None  # [d_model, d_mlp] or [d_model, 2 d_mlp] (gate | in) for gated MLPs
    b_in: torch.Tensor | None
    w_out: torch.Tensor | None  # [d_mlp, d_model]
    b_out: torch.Tensor | None
    act: Any


@dataclass
class _Weights:
    key: tuple
    layers: list[_LayerWeights]
    ln_final: _Norm


def _norm(module: Any, kind: str | None) -> _Norm:
    if kind is None:
        return _Norm("none", None, None, 0.0)
    w = module.w.detach() if kind in ("LN", "RMS") else None
    b = module.b.detach() if kind == "LN" else None
    return _Norm(kind, w, b, float(module.eps))


def _act(model: HookedTransformer, mlp: nn.Module) -> Any:
    """The activation as a function that may overwrite its (temporary) input."""
    name = model.cfg.act_fn
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: torch.ops.aten.gelu_(x, approximate="tanh")
    if name == "gelu":
        return lambda x: torch.ops.aten.gelu_(x)
    if name in ("silu", "swish"):
        return lambda x: F.silu(x, inplace=True)
    if name == "relu":
        return lambda x: F.relu(x, inplace=True)
    return mlp.act_fn  # TransformerLens' own implementation: exact by construction


def _key(model: HookedTransformer) -> tuple:
    return (weights_version(model),) + tuple((p.data_ptr(), p._version) for p in model.parameters())


def _build(model: HookedTransformer) -> _Weights:
    cfg = model.cfg
    layers = []
    for block in model.blocks:
        attn = block.attn
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        if isinstance(attn, GroupedQueryAttention):
            W_K, W_V, b_K, b_V = attn._W_K, attn._W_V, attn._b_K, attn._b_V
        else:
            W_K, W_V, b_K, b_V = attn.W_K, attn.W_V, attn.b_K, attn.b_V
        assert W_K.shape[0] == n_kv
        # [heads, d_model, d_head] -> [d_model, heads * d_head], Q | K | V side by side
        w_qkv = torch.cat(
            [W.detach().permute(1, 0, 2).reshape(cfg.d_model, -1) for W in (attn.W_Q, W_K, W_V)], dim=1
        ).contiguous()
        b_qkv = torch.cat([b.detach().reshape(-1) for b in (attn.b_Q, b_K, b_V)]).contiguous()
        rot = cfg.positional_embedding_type == "rotary"
        if cfg.attn_only:
            w_in = b_in = w_out = b_out = None
            act = None
        else:
            mlp: Any = block.mlp
            if isinstance(mlp, GatedMLP):
                w_in = torch.cat([mlp.W_gate.detach(), mlp.W_in.detach()], dim=1).contiguous()
            else:
                w_in = mlp.W_in.detach()
            b_in, w_out, b_out = mlp.b_in.detach(), mlp.W_out.detach(), mlp.b_out.detach()
            act = _act(model, mlp)
        layers.append(
            _LayerWeights(
                ln1=_norm(block.ln1, cfg.normalization_type),
                ln2=None if cfg.attn_only else _norm(block.ln2, cfg.normalization_type),
                w_qkv=w_qkv,
                b_qkv=b_qkv,
                w_o=attn.W_O.detach().reshape(cfg.n_heads * cfg.d_head, cfg.d_model),
                b_o=attn.b_O.detach(),
                scale=1.0 / float(attn.attn_scale),
                rot_cos=attn.rotary_cos if rot else None,
                rot_sin=attn.rotary_sin if rot else None,
                w_in=w_in,
                b_in=b_in,
                w_out=w_out,
                b_out=b_out,
                act=act,
            )
        )
    return _Weights(
        _key(model),
        layers,
        _norm(model.ln_final, cfg.normalization_type)
        if cfg.normalization_type
        else _Norm("none", None, None, 0.0),
    )


def _weights(model: HookedTransformer) -> _Weights:
    cached: _Weights | None = getattr(model, _CACHE_ATTR, None)
    if cached is not None and cached.key == _key(model):
        return cached
    if cached is not None:
        object.__setattr__(model, _CACHE_ATTR, None)  # free the stale copy before building the new one
    with torch.no_grad():
        built = _build(model)
    object.__setattr__(model, _CACHE_ATTR, built)
    return built


def clear_cache(model: HookedTransformer) -> None:
    """Drop the cached fused weights of ``model`` (they are rebuilt on the next fast call)."""
    if getattr(model, _CACHE_ATTR, None) is not None:
        object.__setattr__(model, _CACHE_ATTR, None)


# ----------------------------------------------------------------------------- forward
def _rms_norm(x: torch.Tensor, d: int, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        return F.rms_norm(x, (d,), w, eps)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def _apply_norm(x: torch.Tensor, n: _Norm, dtype: torch.dtype) -> torch.Tensor:
    if n.kind == "none":
        return x
    d = x.shape[-1]
    if dtype in (torch.float32, torch.float64):
        if n.kind in ("LN", "LNPre"):
            return F.layer_norm(x, (d,), n.w, n.b, n.eps)
        return _rms_norm(x, d, n.w, n.eps)
    # Low precision: TransformerLens normalises in float32, casts back, then applies w (and b).
    xf = x.float()
    y = (
        F.layer_norm(xf, (d,), None, None, n.eps)
        if n.kind in ("LN", "LNPre")
        else _rms_norm(xf, d, None, n.eps)
    ).to(dtype)
    if n.w is not None:
        y = y * n.w
    if n.b is not None:
        y = y + n.b
    return y


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[b, pos, heads, d_head]`` on its first ``rotary_dim`` dims."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    if adjacent:
        flip = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
    else:
        half = r // 2
        flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos[None, :, None, :] + flip * sin[None, :, None, :]
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x [..., d_in] @ w [d_in, d_out] + b`` as one addmm."""
    shape = x.shape[:-1] + (w.shape[1],)
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b, x2, w) if b is not None else x2 @ w
    return y.view(shape)


def _attention(x: torch.Tensor, L: _LayerWeights, model: HookedTransformer) -> torch.Tensor:
    cfg = model.cfg
    b, T, _ = x.shape
    H, dh = cfg.n_heads, cfg.d_head
    n_kv = cfg.n_key_value_heads or H
    qkv = _linear(x, L.w_qkv, L.b_qkv).view(b, T, H + 2 * n_kv, dh)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + n_kv], qkv[:, :, H + n_kv :]
    if L.rot_cos is not None:
        assert L.rot_sin is not None
        cos, sin = L.rot_cos[:T].to(q.dtype), L.rot_sin[:T].to(q.dtype)
        q = _rotate(q, cos, sin, bool(cfg.rotary_adjacent_pairs))
        k = _rotate(k, cos, sin, bool(cfg.rotary_adjacent_pairs))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, pos, d_head]
    if n_kv != H:
        k = k.repeat_interleave(H // n_kv, dim=1)
        v = v.repeat_interleave(H // n_kv, dim=1)
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=L.scale)  # [b, H, pos, d_head]
    z = z.transpose(1, 2).reshape(b, T, H * dh)
    return _linear(z, L.w_o, L.b_o)


def _mlp(x: torch.Tensor, L: _LayerWeights, gated: bool) -> torch.Tensor:
    assert L.w_in is not None and L.w_out is not None
    if gated:
        gl = _linear(x, L.w_in, None)
        d_mlp = L.w_out.shape[0]
        h = (L.act(gl[..., :d_mlp].contiguous()) * gl[..., d_mlp:]).add_(L.b_in)
    else:
        h = L.act(_linear(x, L.w_in, L.b_in))
    return _linear(h, L.w_out, L.b_out)


def _residual_final(model: HookedTransformer, tokens: torch.Tensor, W: _Weights) -> torch.Tensor:
    cfg = model.cfg
    T = tokens.shape[1]
    x = model.embed.W_E[tokens]  # a new tensor: the residual stream is updated in place below
    if cfg.positional_embedding_type == "standard":
        x.add_(model.pos_embed.W_pos[:T])
    gated = bool(cfg.gated_mlp)
    for L in W.layers:
        attn_out = _attention(_apply_norm(x, L.ln1, cfg.dtype), L, model)
        if cfg.attn_only:
            x.add_(attn_out)
        elif cfg.parallel_attn_mlp:
            assert L.ln2 is not None
            mlp_out = _mlp(_apply_norm(x, L.ln2, cfg.dtype), L, gated)
            x.add_(attn_out).add_(mlp_out)
        else:
            assert L.ln2 is not None
            x.add_(attn_out)
            x.add_(_mlp(_apply_norm(x, L.ln2, cfg.dtype), L, gated))
    return _apply_norm(x, W.ln_final, cfg.dtype)


def _batch_needs_mask(model: HookedTransformer, tokens: torch.Tensor) -> bool:
    """True when TransformerLens would build a padding mask for ``tokens`` that is not all ones."""
    tok = model.tokenizer
    if tok is None or getattr(tok, "padding_side", "right") != "left":
        return False
    from transformer_lens import utils

    mask = utils.get_attention_mask(tok, tokens, model.cfg.default_prepend_bos)
    return not bool(mask.all())


def fast_token_nll(model: HookedTransformer, tokens: torch.Tensor, check: bool = True) -> torch.Tensor | None:
    """Next-token NLL ``[b, ctx-1]`` (float32) of ``tokens`` ``[b, ctx]`` through the fast forward.

    Equal to ``-log_softmax(model(tokens).float())`` at the next tokens up to float round-off.
    Returns ``None`` when this model or batch needs TransformerLens' standard forward
    (:func:`unsupported_reason`, a left-padding tokenizer that would mask leading pad tokens, or a
    context longer than the model's current rotary tables).
    ``check=False`` skips the model-level checks (the caller has done them). Runs under
    ``torch.inference_mode`` (no gradients).
    """
    if check and unsupported_reason(model) is not None:
        return None
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens must be [batch, ctx] with 2 <= ctx <= n_ctx, got {tuple(tokens.shape)}")
    tokens = tokens.to(model.embed.W_E.device)
    if _batch_needs_mask(model, tokens):
        return None
    if model.cfg.positional_embedding_type == "rotary" and any(
        b.attn.rotary_cos.shape[0] < tokens.shape[1] for b in model.blocks
    ):
        return None  # TransformerLens extends its rotary tables on the fly; let it do so
    with torch.inference_mode():
        return _token_nll(model, tokens)


def _token_nll(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    W = _weights(model)
    resid = _residual_final(model, tokens, W)[:, :-1]  # [b, ctx-1, d_model]
    b, n, d = resid.shape
    flat = resid.reshape(b * n, d)
    target = tokens[:, 1:].reshape(-1)
    W_U, b_U = model.unembed.W_U.detach(), model.unembed.b_U.detach()
    out = torch.empty(b * n, dtype=torch.float32, device=resid.device)
    for s in range(0, b * n, CE_BLOCK_ROWS):
        logits = torch.addmm(b_U, flat[s : s + CE_BLOCK_ROWS], W_U)  # [rows, d_vocab]
        out[s : s + CE_BLOCK_ROWS] = F.cross_entropy(
            logits.float(), target[s : s + CE_BLOCK_ROWS], reduction="none"
        )
    return out.view(b, n)


def fast_chunk_nll(model: HookedTransformer, tokens: torch.Tensor, check: bool = True) -> torch.Tensor | None:
    """Mean NLL per chunk ``[b]`` (float64) of ``tokens`` ``[b, ctx]``, or ``None``.

    See :func:`fast_token_nll`.
    """
    nll = fast_token_nll(model, tokens, check=check)
    return None if nll is None else nll.double().mean(dim=1)


def flops_per_token(cfg: Any, ctx: int) -> float:
    """Forward FLOPs per token (multiply-add = 2) of a decoder: projections, MLP, causal attention
    (average key length ``(ctx+1)/2``) and the unembedding; norms and activations not counted."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    attn_proj = 2 * cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * n_kv)
    mlp = 0 if cfg.attn_only else 2 * cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    attn_mix = 4 * cfg.n_heads * cfg.d_head * (ctx + 1) / 2
    return float(cfg.n_layers * (attn_proj + mlp + attn_mix) + 2 * cfg.d_model * cfg.d_vocab_out)
