"""The hook-free forward for next-token NLL, on weights gathered from any backend.

A backend (:mod:`qk_subspace.model.backends`) gathers the views of a model's parameters the forward
reads into a :class:`FastModel` -- the architecture (:class:`FastSpec`) and per-layer
:class:`LayerWeights` in TransformerLens layout -- and :func:`token_nll` computes the next-token NLL
from them. Nothing here knows which TransformerLens class the weights came from; see
:mod:`qk_subspace.model.fastpath` for what the forward does and when it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CE_BLOCK_ROWS",
    "CE_BLOCK_ROWS_ACCELERATOR",
    "FULL_PRECISION",
    "FastModel",
    "FastSpec",
    "LayerWeights",
    "Norm",
    "activation",
    "residual_final",
    "token_nll",
]

#: Positions per block of the fused unembedding + cross-entropy on a CPU (the ``[rows, d_vocab]``
#: logits buffer stays small: 26 MB for GPT-2).
CE_BLOCK_ROWS = 128
#: The same on GPUs and other accelerators (fewer, larger kernels; 0.8 GB of float32 logits for GPT-2).
CE_BLOCK_ROWS_ACCELERATOR = 4096
#: Model dtypes computed as TransformerLens computes them up to summation order; lower precisions
#: follow TransformerLens' own rounding points instead.
FULL_PRECISION = (torch.float32, torch.float64)


@dataclass
class Norm:
    """A normalisation: ``kind`` is ``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"`` or ``"none"``."""

    kind: str
    w: torch.Tensor | None  # [d_model]
    b: torch.Tensor | None  # [d_model]
    eps: float


NO_NORM = Norm("none", None, None, 0.0)


@dataclass
class LayerWeights:
    """Views of one block's parameters (no copies: every write to a parameter is seen)."""

    ln1: Norm
    ln2: Norm | None
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
    act: Callable[[torch.Tensor], torch.Tensor] | None


@dataclass(frozen=True)
class FastSpec:
    """What the forward needs to know of the architecture."""

    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    dtype: torch.dtype
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    rotary_adjacent_pairs: bool = False


@dataclass
class FastModel:
    """Everything :func:`token_nll` reads: views of the parameters, gathered afresh for every call."""

    spec: FastSpec
    W_E: torch.Tensor  # [d_vocab, d_model]
    W_pos: torch.Tensor | None  # [n_ctx, d_model] (learned positions only)
    layers: list[LayerWeights]
    ln_final: Norm
    W_U: torch.Tensor  # [d_model, d_vocab_out]
    b_U: torch.Tensor | None  # [d_vocab_out], None when all zero (adding it would change nothing)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An MLP activation by its TransformerLens / Hugging Face name, as a function that may overwrite its
    (temporary) input; ``None`` for a name not reproduced here."""
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: torch.ops.aten.gelu_(x, approximate="tanh")
    if name == "gelu":
        return lambda x: torch.ops.aten.gelu_(x)
    if name in ("silu", "swish"):
        return lambda x: F.silu(x, inplace=True)
    if name == "relu":
        return lambda x: F.relu(x, inplace=True)
    return None


def _rms_norm(x: torch.Tensor, d: int, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        return F.rms_norm(x, (d,), w, eps)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def _apply_norm(x: torch.Tensor, n: Norm, dtype: torch.dtype) -> torch.Tensor:
    if n.kind == "none":
        return x
    d = x.shape[-1]
    if dtype in FULL_PRECISION:
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
    if x2.dtype in FULL_PRECISION:
        x2.addmm_(h, w).add_(b)
    else:
        x2.add_(torch.addmm(b, h, w))


def _attention(x2: torch.Tensor, normed: torch.Tensor, L: LayerWeights, spec: FastSpec, batch: int) -> None:
    """Add the attention block's output for ``normed`` ``[batch*pos, d_model]`` to ``x2`` in place."""
    H, n_kv = spec.n_heads, spec.n_kv_heads
    q, k, v = (_heads(normed, W, b, batch) for W, b in ((L.W_Q, L.b_Q), (L.W_K, L.b_K), (L.W_V, L.b_V)))
    T = q.shape[2]
    if L.rot_cos is not None:
        assert L.rot_sin is not None
        cos, sin = L.rot_cos[:T].to(q.dtype), L.rot_sin[:T].to(q.dtype)
        q = _rotate(q, cos, sin, spec.rotary_adjacent_pairs)
        k = _rotate(k, cos, sin, spec.rotary_adjacent_pairs)
    if n_kv != H:
        k = k.repeat_interleave(H // n_kv, dim=1)
        v = v.repeat_interleave(H // n_kv, dim=1)
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=L.scale)  # [batch, H, pos, d_head]
    z2 = z.transpose(1, 2).reshape(batch * T, H * spec.d_head)
    _add_linear(x2, z2, L.w_o, L.b_o)


def _mlp(x2: torch.Tensor, normed: torch.Tensor, L: LayerWeights) -> None:
    """Add the MLP's output for ``normed`` ``[rows, d_model]`` to ``x2`` in place."""
    assert L.w_in is not None and L.b_in is not None and L.w_out is not None and L.b_out is not None
    assert L.act is not None
    if L.w_gate is not None:
        h = L.act(normed @ L.w_gate).mul_(normed @ L.w_in).add_(L.b_in)
    else:
        h = L.act(torch.addmm(L.b_in, normed, L.w_in))
    _add_linear(x2, h, L.w_out, L.b_out)


def residual_final(fm: FastModel, tokens: torch.Tensor) -> torch.Tensor:
    """The final normalised residual stream ``[batch * pos, d_model]`` of ``tokens`` ``[batch, pos]``."""
    spec = fm.spec
    batch, T = tokens.shape
    x = fm.W_E[tokens]  # a new tensor: the residual stream is updated in place below
    if fm.W_pos is not None:
        x.add_(fm.W_pos[:T])
    x2 = x.view(batch * T, spec.d_model)
    for L in fm.layers:
        normed = _apply_norm(x2, L.ln1, spec.dtype)
        if spec.attn_only:
            _attention(x2, normed, L, spec, batch)
        elif spec.parallel_attn_mlp:
            assert L.ln2 is not None
            normed2 = _apply_norm(x2, L.ln2, spec.dtype)  # both norms read the block's input
            if normed2 is x2:  # no normalisation: keep the input, x2 changes below
                normed2 = x2.clone()
            _attention(x2, normed, L, spec, batch)
            _mlp(x2, normed2, L)
        else:
            assert L.ln2 is not None
            _attention(x2, normed, L, spec, batch)
            _mlp(x2, _apply_norm(x2, L.ln2, spec.dtype), L)
    return _apply_norm(x2, fm.ln_final, spec.dtype)


def block_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-log_softmax(logits)[target]`` ``[rows]``, overwriting ``logits`` ``[rows, d_vocab]`` (no temporaries)."""
    picked = logits.gather(1, target[:, None]).squeeze(1)
    top = logits.amax(dim=1)
    sum_exp = logits.sub_(top[:, None]).exp_().sum(dim=1)
    return sum_exp.log_().add_(top).sub_(picked)


def token_nll(fm: FastModel, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token NLL ``[batch, pos - 1]`` of ``tokens`` ``[batch, pos]`` (float64 for float64 weights,
    else float32), with the logits never materialised for more than one block of positions."""
    batch, T = tokens.shape
    resid = residual_final(fm, tokens).view(batch, T, -1)
    flat = resid[:, :-1].reshape(batch * (T - 1), -1)  # [positions, d_model] (a copy when batch > 1)
    target = tokens[:, 1:].reshape(-1)
    dtype = fm.spec.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(flat.shape[0], dtype=out_dtype, device=flat.device)
    # One logits buffer for all blocks: large fresh allocations are page-faulted in on every use on
    # a CPU, which cost more than the cross-entropy itself (~200k minor faults per 2 x 1024 GPT-2 batch).
    rows = min(CE_BLOCK_ROWS if flat.device.type == "cpu" else CE_BLOCK_ROWS_ACCELERATOR, flat.shape[0])
    full = dtype in FULL_PRECISION
    buf = torch.empty(rows, fm.W_U.shape[1], dtype=dtype, device=flat.device) if full else None
    for s in range(0, flat.shape[0], rows):
        e = min(s + rows, flat.shape[0])
        h = flat[s:e]  # [rows, d_model]
        into = None if buf is None else buf[: e - s]
        logits = torch.mm(h, fm.W_U, out=into) if fm.b_U is None else torch.addmm(fm.b_U, h, fm.W_U, out=into)
        if full:
            out[s:e] = block_nll(logits, target[s:e])
        else:  # low precision: logits rounded to the model dtype, then cross-entropy in float32
            out[s:e] = F.cross_entropy(logits.float(), target[s:e], reduction="none")
    return out.view(batch, T - 1)
