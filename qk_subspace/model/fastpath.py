"""A fast, hook-free forward of a TransformerLens model for next-token NLL (used by :func:`perplexity`).

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

The forward itself is :mod:`qk_subspace.model.fastforward`; each backend
(:mod:`qk_subspace.model.backends`) gathers its weights: a ``HookedTransformer``'s parameters, or the
live views of the Hugging Face parameters a ``TransformerBridge`` wraps (GPT-2 and Llama-family
bridges).

Whenever the model is outside what this module reproduces exactly, :func:`unsupported_reason`
names the reason and callers use the model's own forward instead -- in particular whenever
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
from typing import Any

import torch
from torch import nn

from . import backends
from .fastforward import CE_BLOCK_ROWS, CE_BLOCK_ROWS_ACCELERATOR, FastModel, token_nll

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
    "gather",
    "set_fast_path_enabled",
    "unsupported_reason",
]

#: Environment variable: ``0``/``false``/``off`` disables the fast path by default.
FAST_ENV = "QK_SUBSPACE_FAST"

_enabled_override: bool | None = None


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
    """Names of the modules of ``model`` with forward/backward hooks (incl. TransformerLens hook points).

    A bridge's own capture hooks (which keep a reference to an input and change nothing) do not count.
    """
    try:
        internal = backends.of(model).internal_hook_ids(model)
    except TypeError:
        internal = set()
    names = []
    for name, mod in model.named_modules():
        hooks = (mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks, mod._backward_pre_hooks)
        if any(key not in internal for h in hooks for key in h):
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


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot reproduce ``model``'s standard forward, or ``None`` if it can.

    Checks the configuration, the component classes, patched ``forward`` methods and attached
    hooks (any hook on any module, or a global module hook, disables the fast path).
    """
    try:
        backend = backends.of(model)
    except TypeError as exc:
        return str(exc)
    why = backend.fast_model_reason(model)
    if why:
        return why
    hooks = attached_hooks(model)
    if hooks:
        return f"hooks attached to {hooks[:5]}{' ...' if len(hooks) > 5 else ''}"
    if _global_hooks():
        return "global nn.Module hooks are registered"
    return None


def gather(model: Any, n_positions: int) -> FastModel:
    """The views of ``model``'s parameters the fast forward reads, for batches of ``n_positions`` tokens."""
    return backends.of(model).fast_model(model, n_positions)


def fast_token_nll(model: Any, tokens: torch.Tensor, check: bool = True) -> torch.Tensor | None:
    """Next-token NLL ``[b, ctx-1]`` of ``tokens`` ``[b, ctx]`` through the fast forward.

    Equal to ``-log_softmax(model(tokens).float())`` at the next tokens up to float round-off;
    float64 for a float64 model, float32 otherwise.
    Returns ``None`` when this model or batch needs the model's standard forward
    (:func:`unsupported_reason`, a left-padding tokenizer that would mask leading pad tokens, or a
    context longer than the model's current rotary tables).
    ``check=False`` skips the model-level checks (the caller has done them). Runs under
    ``torch.inference_mode`` (no gradients).
    """
    if check and unsupported_reason(model) is not None:
        return None
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens must be [batch, ctx] with 2 <= ctx <= n_ctx, got {tuple(tokens.shape)}")
    backend = backends.of(model)
    tokens = tokens.to(model.W_U.device)
    if backend.batch_reason(model, tokens) is not None:
        return None
    with torch.inference_mode():
        return token_nll(backend.fast_model(model, tokens.shape[1]), tokens)


def fast_chunk_nll(model: Any, tokens: torch.Tensor, check: bool = True) -> torch.Tensor | None:
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
