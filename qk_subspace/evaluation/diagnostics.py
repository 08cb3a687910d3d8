"""Per-head attention-pattern diagnostics of edited (compressed) heads, in the one hooked model.

Because qk_subspace injects compressed QK circuits by editing ``W_Q`` in place, the edited and the
original model are the same ``Any`` in two weight states. :func:`attention_diagnostics`
compares every head's ``blocks.{l}.attn.hook_pattern`` in the two states on the same tokens.

Streaming (bounded memory). The two forward passes advance *side by side, one layer at a time*:
the residual streams of the original and the edited state (``[b, pos, d_model]`` each) are kept,
and for layer ``l`` the block is run once in the original state (its pattern
``[b, n_heads, q, k]`` is kept) and once in the edited state, whose ``hook_pattern`` hook reduces
both patterns to per-head sums on the fly. So at most one layer's original pattern plus the
edited pattern being hooked are alive, never a cache of all layers, and no logits are computed.
Micro-batches of ``batch_size`` sequences bound it further (default: automatic, so that one
layer's pattern has at most 2^24 entries). Switching states between the two
half-steps is done with :class:`~qk_subspace.edits.parameter_edit.ParameterEdit` (exact, bit-for-bit restore).

Two ways to say what "edited" means:

* ``target`` given: a ``[n_layers, n_heads, d_head, d_head]`` W_QK tensor. It is injected once
  with :func:`~qk_subspace.edits.qk.inject_qk` (to get the new ``W_Q`` and the per-head residual);
  the current weights are the "original" state.
* ``target=None``: the caller is already inside one or more qk_subspace edits
  (``with qs.inject_qk(...)``); the current weights are the "edited" state and the "original"
  state is the weights saved by the outermost active edit (each edit snapshots what it
  overwrites). They are written back temporarily, for each original half-step only, through a
  nested ``ParameterEdit`` that restores the edited weights bit for bit. No baseline has to be
  computed beforehand, and the user's edit is left exactly as it was.

Metrics (per head, natural log, float64). For every query row ``i`` with original pattern
``p = P[i, :]`` and edited pattern ``r = R[i, :]`` (both summing to 1 over the unmasked keys and
exactly 0 at masked keys):

* ``kl`` = KL(p || r) = sum_k p log(p / r); ``js`` = (KL(p || m) + KL(r || m)) / 2 with m = (p + r) / 2
  (bounded by log 2); ``tv`` = sum_k |p - r| / 2. Computed with ``xlogy`` so 0 log 0 = 0: masked
  keys (p = r = 0) contribute nothing. A key the original attends to (p > 0) where the edited
  float pattern underflowed to exactly 0 gets r floored at the smallest positive float of the
  pattern dtype, so ``kl`` stays finite (and is a lower bound of the true value there).
* ``entropy_orig`` / ``entropy_edited`` = -sum_k p log p (nats).
* ``top1_agreement``: fraction of rows whose argmax key is the same.
* ``first_token_mass_orig`` / ``_edited``: attention on key position 0 (the BOS/"sink" token).
* ``kl_floored``: fraction of query rows where that floor was used. A float32 softmax underflows
  once a key's score is ~103 below the row maximum, so a row's KL saturates near
  ``p_k * 103`` nats there: when ``kl_floored > 0``, read KL as "at least", and prefer ``js``/``tv``
  (bounded, no floor needed) to rank badly broken heads.

Each is averaged over all query positions of all sequences (query 0, which can only attend to
itself, included). ``residual`` is the injection residual ``max |W_Q_new^T W_K - target|`` of the
head (0 for heads not edited).

Head-type scores (``head_scores=True``) follow TransformerLens'
``transformer_lens.head_detector.detect_head`` with its defaults (``error_measure="mul"``,
``exclude_bos=False``, ``exclude_current_token=False``): for one sequence the score is
``sum(pattern * detection) / sum(pattern)`` with the detection patterns of
``get_previous_token_head_detection_pattern`` (key ``i-1`` for query ``i``),
``get_duplicate_token_head_detection_pattern`` (earlier keys with the same token) and
``get_induction_head_detection_pattern`` (keys right after an earlier copy of the query token);
scores are averaged over sequences, as ``detect_head`` does for a list of prompts. They are
computed on repeated random token sequences (:func:`repeated_random_tokens`), before and after.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..decomposition.pca import HeadPCA, validate_k
from ..decomposition.plans import Plan, topk_plans
from ..edits.parameter_edit import ParameterEdit, active_edits
from ..edits.qk import QKEdit, inject_qk
from ..model.heads import head_labels, parse_heads
from ..model.weights import named_weights
from .perplexity import validate_tokens
from .sweep import run_sweep

__all__ = [
    "DIVERGENCE_COLUMNS",
    "HEAD_SCORE_NAMES",
    "attention_diagnostics",
    "breaking_heads",
    "diagnostic_batch",
    "diagnostics_sweep",
    "diagnostics_to_records",
    "head_patterns",
    "head_type_scores",
    "repeated_random_tokens",
    "show_patterns",
]

#: Per-head divergence columns of :func:`attention_diagnostics`.
DIVERGENCE_COLUMNS = (
    "kl",
    "js",
    "tv",
    "entropy_orig",
    "entropy_edited",
    "top1_agreement",
    "first_token_mass_orig",
    "first_token_mass_edited",
    "kl_floored",
)
#: Head types scored, in TransformerLens' ``head_detector`` naming without the ``_head`` suffix.
HEAD_SCORE_NAMES = ("previous_token", "duplicate_token", "induction")

#: The float64 statistics work on slabs of at most this many pattern entries (16 MiB per temporary).
SLAB_ELEMENTS = 1 << 21

#: ``batch_size=None`` picks micro-batches whose one-layer pattern has at most this many entries
#: (64 MiB in float32).
AUTO_BATCH_ENTRIES = 1 << 24

WeightPlan = dict[str, torch.Tensor]
#: ``on_layer(layer, pattern_orig, pattern_edited, tokens)``; patterns ``[b, n_heads, q, k]``.
LayerFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


# --------------------------------------------------------------------------- weight states
def _weight_states(
    model: Any,
    target: torch.Tensor | None,
    heads: Any,
    method: Literal["exact", "pinv"],
) -> tuple[WeightPlan | None, WeightPlan | None, torch.Tensor]:
    """Plans ``(original, edited, residual)``; ``None`` means "the current weights".

    ``residual`` is float64 ``[n_layers, n_heads]`` (NaN where unknown).
    """
    cfg = model.cfg
    if target is not None:
        edit = inject_qk(model, target, heads=heads, method=method)
        with edit:
            params = named_weights(model)
            edited = {name: params[name].detach().clone() for name in edit.original_values()}
            residual = edit.max_abs_error.detach().clone()
        return None, edited, residual
    if heads is not None:
        raise ValueError(
            "heads: only used with target= (it selects the heads to inject); inside an edit, "
            "the active edit decides which heads changed"
        )
    stack = active_edits(model)
    if not stack:
        raise ValueError(
            "target is None and no qk_subspace edit is active on the model: pass target=W_QK "
            "[n_layers, n_heads, d_head, d_head], or call inside `with qs.inject_qk(model, W):`"
        )
    original: WeightPlan = {}
    for active in reversed(stack):  # innermost first, so the outermost snapshot wins
        original.update(active.original_values())
    qk_edits = [e for e in stack if isinstance(e, QKEdit)]
    residual = (
        qk_edits[-1].max_abs_error.detach().clone()
        if qk_edits
        else torch.full((cfg.n_layers, cfg.n_heads), math.nan, dtype=torch.float64)
    )
    return original, None, residual


def _edited_heads(model: Any, original: WeightPlan | None, edited: WeightPlan | None) -> torch.Tensor:
    """Bool ``[n_layers, n_heads]``: heads whose ``W_Q`` differs between the two states."""
    cfg = model.cfg
    out = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    params = named_weights(model)
    plan = edited if edited is not None else original
    assert plan is not None
    for layer in range(cfg.n_layers):
        name = f"blocks.{layer}.attn.W_Q"
        if name in plan:
            diff = (plan[name].to(params[name].device) != params[name].detach()).flatten(1).any(1)
            out[layer] = diff.cpu()
    return out


def _state(model: Any, plan: WeightPlan | None) -> contextlib.AbstractContextManager[Any]:
    return ParameterEdit(model, plan, name="diagnostics state") if plan else contextlib.nullcontext()


# --------------------------------------------------------------------------------- streaming
def _stream_pattern_pairs(
    model: Any,
    tokens: torch.Tensor,
    original: WeightPlan | None,
    edited: WeightPlan | None,
    on_layer: LayerFn,
    batch_size: int | None,
    progress: bool,
    desc: str,
) -> None:
    """Run the original and edited forward passes and hand each layer's two patterns
    ``[b, n_heads, q, k]`` to ``on_layer`` (called inside the edited pass's ``hook_pattern`` hook).

    A ``HookedTransformer`` runs the two passes layer by layer (``start_at_layer``), so that only the
    current layer's patterns and the two residual streams are alive at any time. A ``TransformerBridge``
    has no ``start_at_layer``: the original pass keeps every layer's pattern until the edited pass has
    compared it, in micro-batches ``n_layers`` times smaller (the same memory when ``batch_size`` is
    automatic).
    """
    validate_tokens(model, tokens)
    layerwise = hasattr(model, "input_to_embed")
    if batch_size is None:
        batch_size = auto_batch_size(model, tokens.shape[1])
        if not layerwise:
            batch_size = max(1, batch_size // model.cfg.n_layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None (automatic), got {batch_size!r}")
    n_layers = model.cfg.n_layers
    device = model.W_U.device
    tokens = tokens.long()
    starts = range(0, len(tokens), batch_size)
    bar = tqdm(total=len(starts) * n_layers, desc=desc, disable=not progress, leave=False)
    run_batch = _layerwise_pair if layerwise else _full_pass_pair
    try:
        with torch.inference_mode():
            for start in starts:
                run_batch(
                    model, tokens[start : start + batch_size].to(device), original, edited, on_layer, bar
                )
    finally:
        bar.close()


def _layerwise_pair(
    model: Any,
    batch: torch.Tensor,
    original: WeightPlan | None,
    edited: WeightPlan | None,
    on_layer: LayerFn,
    bar: Any,
) -> None:
    with _state(model, original):
        res_o, _, sf_o, mask_o = model.input_to_embed(batch)
    with _state(model, edited):
        res_e, _, sf_e, mask_e = model.input_to_embed(batch)
    for layer in range(model.cfg.n_layers):
        hook_name = f"blocks.{layer}.attn.hook_pattern"
        kept: dict[str, torch.Tensor] = {}

        def keep(pattern: torch.Tensor, hook: Any, kept: dict[str, torch.Tensor] = kept) -> None:
            kept["p"] = pattern

        def compare(
            pattern: torch.Tensor,
            hook: Any,
            layer: int = layer,
            kept: dict[str, torch.Tensor] = kept,
            batch: torch.Tensor = batch,
        ) -> None:
            on_layer(layer, kept["p"], pattern, batch)

        res_o = _one_layer(model, original, res_o, layer, sf_o, mask_o, (hook_name, keep))
        res_e = _one_layer(model, edited, res_e, layer, sf_e, mask_e, (hook_name, compare))
        kept.clear()
        bar.update(1)


def _full_pass_pair(
    model: Any,
    batch: torch.Tensor,
    original: WeightPlan | None,
    edited: WeightPlan | None,
    on_layer: LayerFn,
    bar: Any,
) -> None:
    kept: dict[int, torch.Tensor] = {}
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]

    def keep(pattern: torch.Tensor, hook: Any) -> None:
        kept[int(hook.name.split(".")[1])] = pattern

    def compare(pattern: torch.Tensor, hook: Any) -> None:
        layer = int(hook.name.split(".")[1])
        on_layer(layer, kept.pop(layer), pattern, batch)
        bar.update(1)

    with _state(model, original):
        model.run_with_hooks(batch, return_type=None, fwd_hooks=[(n, keep) for n in names])
    with _state(model, edited):
        model.run_with_hooks(batch, return_type=None, fwd_hooks=[(n, compare) for n in names])


def _one_layer(
    model: Any,
    state: WeightPlan | None,
    resid: torch.Tensor,
    layer: int,
    shortformer: Any,
    mask: Any,
    hook: tuple[str, Callable[..., None]],
) -> torch.Tensor:
    """Run block ``layer`` on the residual stream ``resid`` ``[b, pos, d_model]`` in weight state ``state``."""
    with _state(model, state):
        return model.run_with_hooks(
            resid,
            start_at_layer=layer,
            stop_at_layer=layer + 1,
            shortformer_pos_embed=shortformer,
            attention_mask=mask,
            fwd_hooks=[hook],
        )


def auto_batch_size(model: Any, pos: int) -> int:
    """Sequences per micro-batch so that one layer's pattern ``[b, n_heads, pos, pos]`` has at most
    :data:`AUTO_BATCH_ENTRIES` entries (at least 1): 1 for GPT-2 small at 1024 tokens."""
    return max(1, AUTO_BATCH_ENTRIES // (model.cfg.n_heads * pos * pos))


# ---------------------------------------------------------------------------- the statistics
def _row_stats(p: torch.Tensor, r: torch.Tensor, floor: float) -> dict[str, torch.Tensor]:
    """Per-row statistics of two pattern slices ``[..., q, k]`` (float64); each value ``[..., q]``."""
    underflow = (p > 0) & (r <= 0)
    r_safe = torch.where(underflow, torch.full_like(r, floor), r)
    plogp = torch.special.xlogy(p, p)
    rlogr = torch.special.xlogy(r, r)
    kl = (plogp - torch.special.xlogy(p, r_safe)).sum(-1).clamp_min(0.0)
    m = 0.5 * (p + r)
    js = 0.5 * ((plogp - torch.special.xlogy(p, m)).sum(-1) + (rlogr - torch.special.xlogy(r, m)).sum(-1))
    return {
        "kl": kl,
        "js": js.clamp_min(0.0),
        "tv": 0.5 * (p - r).abs().sum(-1),
        "entropy_orig": -plogp.sum(-1),
        "entropy_edited": -rlogr.sum(-1),
        "top1_agreement": (p.argmax(-1) == r.argmax(-1)).double(),
        "first_token_mass_orig": p[..., 0],
        "first_token_mass_edited": r[..., 0],
        "kl_floored": underflow.any(-1).double(),
    }


class _DivergenceSums:
    """Accumulates per-head sums of :func:`_row_stats` over rows (sequences x query positions)."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sums = {c: torch.zeros(n_layers, n_heads, dtype=torch.float64) for c in DIVERGENCE_COLUMNS}
        self.rows = torch.zeros(n_layers, dtype=torch.float64)

    def __call__(self, layer: int, P: torch.Tensor, R: torch.Tensor, tokens: torch.Tensor) -> None:
        floor = _smallest_positive(R.dtype)
        b, n_heads, q, k = P.shape
        step = max(1, SLAB_ELEMENTS // (q * k))
        for h in range(n_heads):  # slabs of one head and a few sequences bound the float64 temporaries
            for s in range(0, b, step):
                stats = _row_stats(P[s : s + step, h].double(), R[s : s + step, h].double(), floor)
                for c in DIVERGENCE_COLUMNS:
                    self.sums[c][layer, h] += float(stats[c].sum())
        self.rows[layer] += b * q

    def means(self) -> dict[str, torch.Tensor]:
        return {c: s / self.rows[:, None] for c, s in self.sums.items()}


def _smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) number of a float dtype."""
    return (
        float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
        or torch.finfo(dtype).tiny
    )


def detection_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """TransformerLens' head-detector patterns for a batch, bool ``[b, pos, pos]`` per head type.

    ``previous_token``: key ``i-1`` for query ``i``. ``duplicate_token``: keys ``j < i`` holding the
    query's token. ``induction``: keys ``j <= i`` with ``j >= 1`` and ``tokens[j-1] == tokens[i]``,
    ``j - 1 < i`` (the duplicate pattern shifted one key to the right, first column zeroed, tril).
    """
    b, n = tokens.shape
    dev = tokens.device
    idx = torch.arange(n, device=dev)
    strictly_lower = idx[None, :] < idx[:, None]  # [q, k]: k < q
    prev = (idx[None, :] == idx[:, None] - 1).expand(b, n, n)
    dup = (tokens[:, :, None] == tokens[:, None, :]) & strictly_lower
    ind = torch.zeros_like(dup)
    ind[:, :, 1:] = dup[:, :, :-1]
    ind &= idx[None, :] <= idx[:, None]
    return {"previous_token": prev, "duplicate_token": dup, "induction": ind}


def head_type_scores(pattern: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Head-type scores of one layer, per sequence, as in TransformerLens' ``detect_head``
    (``error_measure="mul"``, no exclusions): ``sum(pattern * detection) / sum(pattern)``.

    Args:
        pattern: ``[b, n_heads, q, k]`` attention patterns.
        tokens: ``[b, q]`` the tokens they were computed on.

    Returns:
        ``{name: [b, n_heads] float64}`` for every name in :data:`HEAD_SCORE_NAMES`.
    """
    P = pattern.double()
    total = P.sum(dim=(-1, -2))  # [b, h]
    return {
        name: (P * det[:, None].to(P.dtype)).sum(dim=(-1, -2)) / total
        for name, det in detection_patterns(tokens.to(P.device)).items()
    }


class _HeadScoreSums:
    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sums = {
            f"{name}_{which}": torch.zeros(n_layers, n_heads, dtype=torch.float64)
            for name in HEAD_SCORE_NAMES
            for which in ("orig", "edited")
        }
        self.seqs = torch.zeros(n_layers, dtype=torch.float64)

    def __call__(self, layer: int, P: torch.Tensor, R: torch.Tensor, tokens: torch.Tensor) -> None:
        for which, pat in (("orig", P), ("edited", R)):
            for name, score in head_type_scores(pat, tokens).items():
                self.sums[f"{name}_{which}"][layer] += score.sum(0).cpu()
        self.seqs[layer] += P.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        return {c: s / self.seqs[:, None] for c, s in self.sums.items()}


# ------------------------------------------------------------------------------ token helpers
def repeated_random_tokens(
    model: Any,
    n_seqs: int = 4,
    half_len: int | None = None,
    seed: int = 0,
    prepend_bos: bool | None = None,
) -> torch.Tensor:
    """Sequences ``[BOS] R R`` of a random token block ``R`` repeated twice (induction test data).

    Args:
        n_seqs: number of sequences.
        half_len: length of ``R`` (default: 64, capped so the sequence fits ``n_ctx``).
        seed: seed of the random block.
        prepend_bos: put the tokenizer's BOS first (default: when the model has a tokenizer with a
            BOS token and ``cfg.default_prepend_bos``). Random tokens avoid the BOS id.

    Returns:
        ``[n_seqs, 2 * half_len (+1)]`` long tensor on the CPU.
    """
    tok = getattr(model, "tokenizer", None)
    bos_id = getattr(tok, "bos_token_id", None) if tok is not None else None
    if prepend_bos is None:
        prepend_bos = bos_id is not None and bool(model.cfg.default_prepend_bos)
    if prepend_bos and bos_id is None:
        raise ValueError("prepend_bos=True needs a model tokenizer with a bos_token_id")
    extra = 1 if prepend_bos else 0
    if half_len is None:
        half_len = min(64, (model.cfg.n_ctx - extra) // 2)
    if isinstance(half_len, bool) or not isinstance(half_len, int) or half_len < 1:
        raise ValueError(f"half_len must be a positive integer, got {half_len!r}")
    if 2 * half_len + extra > model.cfg.n_ctx:
        raise ValueError(
            f"half_len={half_len}: 2*half_len{' + 1' if extra else ''} exceeds n_ctx={model.cfg.n_ctx}"
        )
    if isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 1:
        raise ValueError(f"n_seqs must be a positive integer, got {n_seqs!r}")
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    block = torch.randint(0, vocab - (1 if bos_id is not None else 0), (n_seqs, half_len), generator=g)
    if bos_id is not None:
        block = block + (block >= int(bos_id)).long()  # skip the BOS id
    seqs = torch.cat([block, block], dim=1)
    if prepend_bos:
        seqs = torch.cat([torch.full((n_seqs, 1), int(bos_id), dtype=torch.long), seqs], dim=1)  # type: ignore[arg-type]
    return seqs.long()


def diagnostic_batch(
    tokens: torch.Tensor, n_seqs: int = 8, ctx: int = 128, skip_tokens: int = 0
) -> torch.Tensor:
    """A small diagnostic batch ``[n_seqs, ctx]`` cut from a token stream after ``skip_tokens``.

    Args:
        tokens: 1-D token stream, or ``[n, L]`` chunks (flattened in order).
        skip_tokens: tokens to skip first, e.g. the number used for perplexity, so the batch is
            separate from them.
    """
    stream = torch.as_tensor(tokens).flatten().long()
    need = n_seqs * ctx
    if n_seqs < 1 or ctx < 2:
        raise ValueError(f"n_seqs must be >= 1 and ctx >= 2, got n_seqs={n_seqs}, ctx={ctx}")
    if skip_tokens < 0 or len(stream) - skip_tokens < need:
        raise ValueError(
            f"diagnostic_batch: need {need} tokens after skip_tokens={skip_tokens}, the stream has {len(stream)}"
        )
    return stream[skip_tokens : skip_tokens + need].reshape(n_seqs, ctx).clone()


# ------------------------------------------------------------------------------------ public
def attention_diagnostics(
    model: Any,
    tokens: torch.Tensor,
    target: torch.Tensor | None = None,
    heads: Any = None,
    *,
    method: Literal["exact", "pinv"] = "exact",
    head_scores: bool = True,
    rep_tokens: torch.Tensor | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Compare every head's attention pattern before and after an edit, on the same tokens.

    Args:
        model: the Any (one model; no copy is made).
        tokens: ``[n_seqs, pos]`` token ids (e.g. 8 x 128).
        target: W_QK ``[n_layers, n_heads, d_head, d_head]`` to inject with ``inject_qk`` (then the
            current weights are the original); ``None`` when called inside an active qk_subspace
            edit (then the current weights are the edited ones; see the module docstring).
        heads: heads to inject ``target`` into (default all; only with ``target``). Rows are
            returned for every head either way: unedited heads of later layers change too.
        method: injection method for ``target`` (``"exact"`` or ``"pinv"``).
        head_scores: also compute previous-token / duplicate-token / induction scores before and
            after, on ``rep_tokens``.
        rep_tokens: ``[n, pos]`` sequences for the head scores (default
            :func:`repeated_random_tokens` ``(model)``: 4 sequences ``[BOS] R R``, ``|R| = 64``).
        batch_size: sequences per micro-batch (memory scales with it; results do not). ``None``:
            automatic, one layer's pattern at most 2^24 entries (1 sequence for GPT-2 at 1024).
        progress: show a tqdm bar.

    Returns:
        DataFrame with one row per head (flat order): ``layer``, ``head``, ``label``, ``edited``
        (its ``W_Q`` differs between the states), :data:`DIVERGENCE_COLUMNS`, ``residual`` and,
        with ``head_scores``, ``{previous_token,duplicate_token,induction}_{orig,edited}``.
        ``df.attrs`` records ``n_seqs``, ``pos`` and ``mode`` (``"target"``/``"inside"``).

    The weights are as they were on return (also on errors); no hooks are left on the model.
    """
    cfg = model.cfg
    if target is not None and heads is not None:
        parse_heads(heads, cfg.n_layers, cfg.n_heads)  # validate early
    original, edited, residual = _weight_states(model, target, heads, method)
    edited_mask = _edited_heads(model, original, edited)
    div = _DivergenceSums(cfg.n_layers, cfg.n_heads)
    _stream_pattern_pairs(model, tokens, original, edited, div, batch_size, progress, "attention diagnostics")
    columns: dict[str, Any] = {}
    for c, v in div.means().items():
        columns[c] = v.flatten().numpy()
    columns["residual"] = residual.flatten().cpu().numpy()
    if head_scores:
        rep = repeated_random_tokens(model) if rep_tokens is None else rep_tokens
        hs = _HeadScoreSums(cfg.n_layers, cfg.n_heads)
        _stream_pattern_pairs(model, rep, original, edited, hs, batch_size, progress, "head-type scores")
        for c, v in hs.means().items():
            columns[c] = v.flatten().numpy()
    layers, hds = np.divmod(np.arange(cfg.n_layers * cfg.n_heads), cfg.n_heads)
    df = pd.DataFrame(
        {
            "layer": layers,
            "head": hds,
            "label": head_labels(cfg.n_layers, cfg.n_heads),
            "edited": edited_mask.flatten().numpy(),
            **columns,
        }
    )
    df.attrs.update(
        {
            "n_seqs": int(tokens.shape[0]),
            "pos": int(tokens.shape[1]),
            "mode": "target" if target is not None else "inside",
        }
    )
    return df


def head_patterns(
    model: Any,
    tokens: torch.Tensor,
    heads: Iterable[int] | Iterable[tuple[int, int]] | torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    inject_heads: Any = None,
    method: Literal["exact", "pinv"] = "exact",
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Original and edited attention patterns of chosen heads on one sequence (for figures).

    Args:
        tokens: ``[pos]`` or ``[1, pos]`` token ids.
        heads: the heads to return (flat indices, ``(layer, head)`` pairs or a bool mask).
        target, inject_heads, method: as ``target``, ``heads``, ``method`` of
            :func:`attention_diagnostics` (``target=None``: inside an active edit).

    Returns:
        ``{(layer, head): (original [pos, pos], edited [pos, pos])}`` float64 numpy arrays.
    """
    cfg = model.cfg
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[0] != 1:
        raise ValueError(f"tokens: head_patterns takes one sequence, got shape {tuple(tokens.shape)}")
    mask = parse_heads(heads, cfg.n_layers, cfg.n_heads)
    original, edited, _ = _weight_states(model, target, inject_heads, method)
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def grab(layer: int, P: torch.Tensor, R: torch.Tensor, toks: torch.Tensor) -> None:
        for h in torch.nonzero(mask[layer]).flatten().tolist():
            out[(layer, h)] = (P[0, h].double().cpu().numpy(), R[0, h].double().cpu().numpy())

    _stream_pattern_pairs(model, tokens, original, edited, grab, 1, False, "patterns")
    return out


def diagnostics_sweep(
    model: Any,
    pca: HeadPCA,
    tokens: torch.Tensor,
    ks: Sequence[int] | Iterable[int],
    *,
    heads: Any = None,
    method: Literal["exact", "pinv"] = "exact",
    head_scores: bool = True,
    rep_tokens: torch.Tensor | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    on_k: Callable[[int, pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """:func:`attention_diagnostics` of the top-K reconstruction of a ``"qk"`` PCA for every K: a long frame.

    Args:
        heads: heads to edit (default all), as for :func:`~qk_subspace.edits.qk.inject_qk`.
        method: the injection method (``"exact"`` or ``"pinv"``).

    Returns:
        The per-head rows of every K stacked, with a leading ``K`` column (see
        :func:`diagnostics_to_records` for the JSON form). ``on_k(K, df_K)`` is called per K.
    """
    ks = [validate_k(k, pca.n_heads_) for k in ks]
    if not ks:
        raise ValueError("ks must contain at least one K")
    cfg = model.cfg
    mask = None if heads is None else parse_heads(heads, cfg.n_layers, cfg.n_heads).numpy().ravel()
    plans = topk_plans(pca, ks)
    if mask is not None:
        plans = [Plan(p.label, p.mixing.restrict(mask), p.columns, p.tail) for p in plans]
    frames: list[pd.DataFrame] = []

    def inside(m: Any, plan: Plan) -> dict[str, Any]:
        df = attention_diagnostics(
            m, tokens, head_scores=head_scores, rep_tokens=rep_tokens, batch_size=batch_size, progress=False
        )
        df.insert(0, "K", plan.columns["K"])
        frames.append(df)
        if on_k is not None:
            on_k(plan.columns["K"], df)
        return {}

    run_sweep(
        model, None, "qk", pca.heads_, plans, inside=inside, progress=progress,
        edit_options={"method": method}, desc="diagnostics K sweep",
    )  # fmt: skip
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update({**frames[0].attrs, "mode": "target"})
    return out


def diagnostics_to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-friendly rows (plain Python numbers; NaN/Inf become ``None``) of a diagnostics frame."""
    records = []
    for row in df.to_dict(orient="records"):
        clean: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, (np.bool_, bool)):
                clean[key] = bool(value)
            elif isinstance(value, (np.integer,)):
                clean[key] = int(value)
            elif isinstance(value, (float, np.floating)):
                clean[key] = float(value) if math.isfinite(float(value)) else None
            else:
                clean[key] = value
        records.append(clean)
    return records


def summarize_diagnostics(df: pd.DataFrame) -> dict[str, Any]:
    """Scalar summary of one K's per-head frame (for the sweep table)."""
    worst = int(df["kl"].to_numpy().argmax())
    return {
        "diag_mean_kl": float(df["kl"].mean()),
        "diag_max_kl": float(df["kl"].max()),
        "diag_max_kl_head": str(df["label"].iloc[worst]),
        "diag_mean_js": float(df["js"].mean()),
        "diag_mean_top1_agreement": float(df["top1_agreement"].mean()),
    }


def breaking_heads(
    df: pd.DataFrame, threshold: float = 0.1, metric: str = "kl", top: int | None = 10
) -> pd.DataFrame:
    """The heads that break first as K decreases: at the highest K where any head's ``metric``
    exceeds ``threshold``, the heads above it, largest first.

    Args:
        df: long frame of :func:`diagnostics_sweep` (column ``K``).
        threshold: the breaking threshold of ``metric`` (nats for ``kl``/``js``).
        top: keep this many rows (``None``: all heads above the threshold).

    Returns:
        DataFrame with ``K`` (that highest K), ``layer``, ``head``, ``label``, ``metric`` value at K,
        ``first_break_K`` (the highest K at which this head exceeds the threshold, which is K here),
        and the head's value at every K as ``{metric}@K{k}`` columns. Empty if no head ever breaks.
    """
    if "K" not in df.columns or metric not in df.columns:
        raise ValueError(
            f"df: needs columns 'K' and {metric!r} (a diagnostics_sweep frame), got {list(df.columns)}"
        )
    above = df[df[metric] > threshold]
    cols = ["K", "layer", "head", "label", metric]
    if above.empty:
        return pd.DataFrame(columns=cols)
    k_star = int(above["K"].max())
    at = df[df["K"] == k_star]
    broken = at[at[metric] > threshold].sort_values(metric, ascending=False)
    if top is not None:
        broken = broken.head(top)
    out = broken[cols].reset_index(drop=True)
    wide = df.pivot_table(index="label", columns="K", values=metric)
    for k in sorted(wide.columns, reverse=True):
        out[f"{metric}@K{k}"] = out["label"].map(wide[k]).to_numpy()
    out.attrs.update({"threshold": threshold, "metric": metric, "K_break": k_star})
    return out


def show_patterns(
    pairs: Mapping[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    tokens: Sequence[str],
) -> Any:
    """Render original and edited patterns with ``circuitsvis.attention.attention_heads``.

    Args:
        pairs: output of :func:`head_patterns`.
        tokens: token strings of the sequence (e.g. ``model.to_str_tokens(tokens)``).

    Returns:
        The circuitsvis render object (displays in a notebook; ``str()`` gives HTML).

    Needs the optional extra ``pip install "qk_subspace[viz]"`` (circuitsvis).
    """
    try:
        import circuitsvis.attention as cv_attention
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "show_patterns needs circuitsvis: pip install 'qk_subspace[viz]' (or pip install circuitsvis)"
        ) from exc
    if not pairs:
        raise ValueError("pairs is empty: pass head_patterns(...) for at least one head")
    mats, names = [], []
    for (layer, head), (orig, edit) in pairs.items():
        mats += [torch.as_tensor(orig, dtype=torch.float32), torch.as_tensor(edit, dtype=torch.float32)]
        names += [f"L{layer}H{head} original", f"L{layer}H{head} edited"]
    if len(tokens) != mats[0].shape[-1]:
        raise ValueError(f"tokens: {len(tokens)} labels for patterns over {mats[0].shape[-1]} positions")
    return cv_attention.attention_heads(
        attention=torch.stack(mats), tokens=list(tokens), attention_head_names=names
    )
