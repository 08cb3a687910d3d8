"""A fast, hook-free forward of a HookedTransformer for next-token NLL (used by :func:`perplexity`).

TransformerLens' forward is written for inspection: every block materialises the attention
scores and pattern ``[batch, n_heads, pos, pos]`` (so that ``hook_attn_scores``/``hook_pattern``
can see them), re-arranges and copies ``W_Q/W_K/W_V/W_O/W_U`` on every call, and the caller then
builds full-vocabulary log-probabilities ``[batch, pos, d_vocab]``. This module computes the same
function from the *same parameter tensors* of the same model (edited ``W_Q`` in place included):

* every weight is read straight from the model's parameters (detached views, gathered afresh on
  every call): nothing is copied or cached, so an edit by any route -- ``inject_qk``,
  ``load_state_dict``, an optimiser step, ``p.data[...] = x`` -- is always seen, and an injection
  costs the fast path nothing to pick up;
* Q, K and V per head with one batched matmul each straight from ``W_Q/W_K/W_V``
  ``[heads, d_model, d_head]``, giving the per-head contiguous layout the SDPA kernel reads fastest;
* attention through :func:`torch.nn.functional.scaled_dot_product_attention` (``is_causal``),
  which never forms the ``pos x pos`` pattern;
* fused ``F.layer_norm`` / ``F.rms_norm`` / ``F.gelu`` kernels, and the attention and MLP outputs
  accumulated straight into the residual stream (``addmm_``, float32/float64);
* the unembedding and cross-entropy in row blocks (:data:`CE_BLOCK_ROWS` positions at a time on a
  CPU, :data:`CE_BLOCK_ROWS_ACCELERATOR` on a GPU) through one reused logits buffer, so the
  ``[batch, pos, d_vocab]`` logits are never materialised; a zero unembedding bias is not added.

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

__all__ = [
    "CE_BLOCK_ROWS",
    "CE_BLOCK_ROWS_ACCELERATOR",
    "FAST_ENV",
    "attached_hooks",
    "attention_mix_flops",
    "fast_chunk_nll",
    "fast_path_enabled",
    "fast_token_nll",
    "flops_per_token",
    "set_fast_path_enabled",
    "unsupported_reason",
]

#: Environment variable: ``0``/``false``/``off`` disables the fast path by default.
FAST_ENV = "QK_SUBSPACE_FAST"
#: Positions per block of the fused unembedding + cross-entropy on a CPU (the ``[rows, d_vocab]``
#: logits buffer stays small: 26 MB for GPT-2).
CE_BLOCK_ROWS = 128
#: The same on GPUs and other accelerators (fewer, larger kernels; 0.8 GB of float32 logits for GPT-2).
CE_BLOCK_ROWS_ACCELERATOR = 4096

_enabled_override: bool | None = None
#: Model dtypes computed as TransformerLens computes them up to summation order; lower precisions
#: follow TransformerLens' own rounding points instead.
_FULL_PRECISION = (torch.float32, torch.float64)

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


# ----------------------------------------------------------------------------- weights (views only)
@dataclass
class _Norm:
    kind: str  # "LN", "LNPre", "RMS", "RMSPre", "none"
    w: torch.Tensor | None
    b: torch.Tensor | None
    eps: float


@dataclass
class _LayerWeights:
    """Views of one block's parameters (no copies: every write to a parameter is seen)."""

    ln1: _Norm
    ln2: _Norm | None
    W_Q: torch.Tensor  # [n_heads, d_model, d_head]
    b_Q: torch.Tensor  # [n_heads, d_head]
    W_K: torch.Tensor  # [n_kv, d_model, d_head] (the unrepeated key/value heads for GQA)
    b_K: torch.Tensor  # [n_kv, d_head]
    W_V: torch.Tensor  # [n_kv, d_model, d_head]
    b_V: torch.Tensor  # [n_kv, d_head]
    w_o: torch.Tensor  # [n_heads * d_head, d_model]
    b_o: torch.Tensor  # [d_model]
    scale: float
    rot_cos: torch.Tensor | None  # [n_rot_ctx, rotary_dim]
    rot_sin: torch.Tensor | None
    w_gate: torch.Tensor | None  # [d_model, d_mlp] (gated MLPs only)
    w_in: torch.Tensor | None  # [d_model, d_mlp]
    b_in: torch.Tensor | None  # [d_mlp]
    w_out: torch.Tensor | None  # [d_mlp, d_model]
    b_out: torch.Tensor | None  # [d_model]
    act: Any


@dataclass
class _Weights:
    layers: list[_LayerWeights]
    ln_final: _Norm
    W_U: torch.Tensor  # [d_model, d_vocab_out]
    b_U: torch.Tensor | None  # [d_vocab_out], None when all zero (adding it would change nothing)


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


def _weights(model: HookedTransformer) -> _Weights:
    """Detached views of the parameters the fast forward reads, gathered afresh on every call.

    Nothing is copied or cached, so a write to any parameter by any route (``inject_qk``,
    ``load_state_dict``, an optimiser step, ``p.data[...] = x``, ``p.data = t``) is always seen.
    """
    cfg = model.cfg
    layers = []
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, GroupedQueryAttention):
            W_K, W_V, b_K, b_V = attn._W_K, attn._W_V, attn._b_K, attn._b_V
        else:
            W_K, W_V, b_K, b_V = attn.W_K, attn.W_V, attn.b_K, attn.b_V
        assert W_K.shape[0] == (cfg.n_key_value_heads or cfg.n_heads)
        rot = cfg.positional_embedding_type == "rotary"
        w_gate = w_in = b_in = w_out = b_out = act = None
        if not cfg.attn_only:
            mlp: Any = block.mlp
            w_gate = mlp.W_gate.detach() if isinstance(mlp, GatedMLP) else None
            w_in, b_in = mlp.W_in.detach(), mlp.b_in.detach()
            w_out, b_out = mlp.W_out.detach(), mlp.b_out.detach()
            act = _act(model, mlp)
        layers.append(
            _LayerWeights(
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
    return _Weights(
        layers,
        _norm(model.ln_final, cfg.normalization_type)
        if cfg.normalization_type
        else _Norm("none", None, None, 0.0),
        model.unembed.W_U.detach(),
        b_U if bool(b_U.any()) else None,
    )


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
    if dtype in _FULL_PRECISION:
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
    """Rotary embedding of ``x`` ``[b, heads, pos, d_head]`` on its first ``rotary_dim`` dims."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    if adjacent:
        flip = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
    else:
        half = r // 2
        flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + flip * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


def _heads(x2: torch.Tensor, W: torch.Tensor, b: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-head projection ``x2 [batch*pos, d_model] @ W [n, d_model, d_head] + b [n, d_head]``.

    One batched matmul straight from the parameter (no fused copy); returns ``[batch, n, pos, d_head]``
    with each head's positions contiguous, the layout the SDPA kernel reads fastest.
    """
    n = W.shape[0]
    out = torch.baddbmm(b.unsqueeze(1), x2.expand(n, -1, -1), W)  # [n, batch*pos, d_head]
    return out.view(n, batch, -1, W.shape[-1]).transpose(0, 1)


def _add_linear(x2: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    """``x2 += h @ w + b`` in place (``x2 [rows, d_out]``, ``h [rows, d_in]``, ``w [d_in, d_out]``).

    float32/float64 accumulate the product straight into the residual stream (``addmm_``, no
    temporary); low precision rounds ``h @ w + b`` first, like TransformerLens.
    """
    if x2.dtype in _FULL_PRECISION:
        x2.addmm_(h, w).add_(b)
    else:
        x2.add_(torch.addmm(b, h, w))


def _attention(
    x2: torch.Tensor, normed: torch.Tensor, L: _LayerWeights, model: HookedTransformer, batch: int
) -> None:
    """Add the attention block's output for ``normed`` ``[batch*pos, d_model]`` to ``x2`` in place."""
    cfg = model.cfg
    H, n_kv = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    q, k, v = (_heads(normed, W, b, batch) for W, b in ((L.W_Q, L.b_Q), (L.W_K, L.b_K), (L.W_V, L.b_V)))
    T = q.shape[2]
    if L.rot_cos is not None:
        assert L.rot_sin is not None
        cos, sin = L.rot_cos[:T].to(q.dtype), L.rot_sin[:T].to(q.dtype)
        q = _rotate(q, cos, sin, bool(cfg.rotary_adjacent_pairs))
        k = _rotate(k, cos, sin, bool(cfg.rotary_adjacent_pairs))
    if n_kv != H:
        k = k.repeat_interleave(H // n_kv, dim=1)
        v = v.repeat_interleave(H // n_kv, dim=1)
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=L.scale)  # [batch, H, pos, d_head]
    z2 = z.transpose(1, 2).reshape(batch * T, H * cfg.d_head)
    _add_linear(x2, z2, L.w_o, L.b_o)


def _mlp(x2: torch.Tensor, normed: torch.Tensor, L: _LayerWeights) -> None:
    """Add the MLP's output for ``normed`` ``[rows, d_model]`` to ``x2`` in place."""
    assert L.w_in is not None and L.b_in is not None and L.w_out is not None and L.b_out is not None
    if L.w_gate is not None:
        h = L.act(normed @ L.w_gate).mul_(normed @ L.w_in).add_(L.b_in)
    else:
        h = L.act(torch.addmm(L.b_in, normed, L.w_in))
    _add_linear(x2, h, L.w_out, L.b_out)


def _residual_final(model: HookedTransformer, tokens: torch.Tensor, W: _Weights) -> torch.Tensor:
    """The final normalised residual stream ``[batch * pos, d_model]`` of ``tokens`` ``[batch, pos]``."""
    cfg = model.cfg
    batch, T = tokens.shape
    x = model.embed.W_E[tokens]  # a new tensor: the residual stream is updated in place below
    if cfg.positional_embedding_type == "standard":
        x.add_(model.pos_embed.W_pos[:T])
    x2 = x.view(batch * T, cfg.d_model)
    for L in W.layers:
        normed = _apply_norm(x2, L.ln1, cfg.dtype)
        if cfg.attn_only:
            _attention(x2, normed, L, model, batch)
        elif cfg.parallel_attn_mlp:
            assert L.ln2 is not None
            normed2 = _apply_norm(x2, L.ln2, cfg.dtype)  # both norms read the block's input
            if normed2 is x2:  # no normalisation: keep the input, x2 changes below
                normed2 = x2.clone()
            _attention(x2, normed, L, model, batch)
            _mlp(x2, normed2, L)
        else:
            assert L.ln2 is not None
            _attention(x2, normed, L, model, batch)
            _mlp(x2, _apply_norm(x2, L.ln2, cfg.dtype), L)
    return _apply_norm(x2, W.ln_final, cfg.dtype)


def _batch_needs_mask(model: HookedTransformer, tokens: torch.Tensor) -> bool:
    """True when TransformerLens would build a padding mask for ``tokens`` that is not all ones."""
    tok = model.tokenizer
    if tok is None or getattr(tok, "padding_side", "right") != "left":
        return False
    from transformer_lens import utils

    mask = utils.get_attention_mask(tok, tokens, model.cfg.default_prepend_bos)
    return not bool(mask.all())


def fast_token_nll(model: HookedTransformer, tokens: torch.Tensor, check: bool = True) -> torch.Tensor | None:
    """Next-token NLL ``[b, ctx-1]`` of ``tokens`` ``[b, ctx]`` through the fast forward.

    Equal to ``-log_softmax(model(tokens).float())`` at the next tokens up to float round-off;
    float64 for a float64 model, float32 otherwise.
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


def _block_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-log_softmax(logits)[target]`` ``[rows]``, overwriting ``logits`` ``[rows, d_vocab]`` (no temporaries)."""
    picked = logits.gather(1, target[:, None]).squeeze(1)
    top = logits.amax(dim=1)
    sum_exp = logits.sub_(top[:, None]).exp_().sum(dim=1)
    return sum_exp.log_().add_(top).sub_(picked)


def _token_nll(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    W = _weights(model)
    batch, T = tokens.shape
    resid = _residual_final(model, tokens, W).view(batch, T, -1)
    flat = resid[:, :-1].reshape(batch * (T - 1), -1)  # [positions, d_model] (a copy when batch > 1)
    target = tokens[:, 1:].reshape(-1)
    dtype = model.cfg.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(flat.shape[0], dtype=out_dtype, device=flat.device)
    # One logits buffer for all blocks: large fresh allocations are page-faulted in on every use on
    # a CPU, which cost more than the cross-entropy itself (~200k minor faults per 2 x 1024 GPT-2 batch).
    rows = min(CE_BLOCK_ROWS if flat.device.type == "cpu" else CE_BLOCK_ROWS_ACCELERATOR, flat.shape[0])
    full = dtype in _FULL_PRECISION
    buf = torch.empty(rows, W.W_U.shape[1], dtype=dtype, device=flat.device) if full else None
    for s in range(0, flat.shape[0], rows):
        e = min(s + rows, flat.shape[0])
        h = flat[s:e]  # [rows, d_model]
        into = None if buf is None else buf[: e - s]
        logits = torch.mm(h, W.W_U, out=into) if W.b_U is None else torch.addmm(W.b_U, h, W.W_U, out=into)
        if full:
            out[s:e] = _block_nll(logits, target[s:e])
        else:  # low precision: logits rounded to the model dtype, then cross-entropy in float32
            out[s:e] = F.cross_entropy(logits.float(), target[s:e], reduction="none")
    return out.view(batch, T - 1)


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
    return float(
        cfg.n_layers * (attn_proj + mlp) + attention_mix_flops(cfg, ctx) + 2 * cfg.d_model * cfg.d_vocab_out
    )


def attention_mix_flops(cfg: Any, ctx: int) -> float:
    """The part of :func:`flops_per_token` in the attention itself (``q k^T`` and ``pattern v``, all
    layers, causal: average key length ``(ctx+1)/2``); the rest are matmuls with weights."""
    return float(cfg.n_layers * 4 * cfg.n_heads * cfg.d_head * (ctx + 1) / 2)
