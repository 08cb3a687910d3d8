"""Perplexity of a Any on token chunks, and paired comparisons between runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model import fastpath

__all__ = ["PerplexityResult", "RatioCI", "perplexity", "paired_ratio", "validate_tokens"]


@dataclass
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes:
        ppl: ``exp(mean_nll)``.
        mean_nll: mean negative log-likelihood per predicted token (nats).
        nll_per_chunk: ``[n_chunks]`` float64, mean NLL of each chunk (for paired comparisons).
        n_tokens: number of predicted tokens (each chunk predicts ``ctx - 1``).
        path: forward used: ``"fast"`` (:mod:`qk_subspace.model.fastpath`), ``"standard"``
            (TransformerLens' forward) or ``"mixed"`` (some micro-batches needed the standard one).
    """

    ppl: float
    mean_nll: float
    nll_per_chunk: np.ndarray = field(repr=False)
    n_tokens: int
    path: str = "standard"


@dataclass
class RatioCI:
    """Perplexity ratio ``ppl_b / ppl_a`` with a bootstrap confidence interval over chunks."""

    ratio: float
    low: float
    high: float
    confidence: float


def validate_tokens(model: Any, tokens: torch.Tensor) -> None:
    """Check that ``tokens`` is ``[n_chunks, ctx]`` of integer ids the model accepts."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor [n_chunks, ctx], got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have rank 2 [n_chunks, ctx], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
        raise TypeError(f"tokens must be an integer tensor (torch.long), got dtype {tokens.dtype}")
    n, ctx = tokens.shape
    if n == 0 or ctx < 2:
        raise ValueError(
            f"tokens must have at least 1 chunk of at least 2 tokens, got shape {tuple(tokens.shape)}"
        )
    if ctx > model.cfg.n_ctx:
        raise ValueError(f"tokens: ctx={ctx} is longer than the model's n_ctx={model.cfg.n_ctx}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= model.cfg.d_vocab:
        raise ValueError(
            f"tokens: ids must be in [0, {model.cfg.d_vocab - 1}] (the model's vocabulary), got min {lo}, max {hi}"
        )


def _chunk_nll(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean NLL per chunk ``[b]`` (float64) for a micro-batch ``[b, ctx]``."""
    logits = model(batch, return_type="logits")  # [b, ctx, d_vocab]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)  # [b, ctx-1]
    return nll.double().mean(dim=1)


def perplexity(
    model: Any,
    tokens: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
    fast: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` ``[n_chunks, ctx]``.

    Every chunk predicts its tokens 1..ctx-1 from their prefixes. Runs under
    ``torch.inference_mode`` in micro-batches of ``batch_size`` chunks; only one micro-batch of
    logits is alive at a time. Shows a tqdm bar unless ``progress=False``.

    ``fast`` (default ``None``: on unless ``QK_SUBSPACE_FAST=0`` or
    ``fastpath.set_fast_path_enabled(False)``) computes the same NLLs with the hook-free forward of
    :mod:`qk_subspace.model.fastpath` on the same model and weights (edits in place included; within
    float round-off of the standard forward), and never materialises the logits. Models or calls it
    cannot reproduce exactly -- any attached hook, unsupported configurations, see
    ``fastpath.unsupported_reason(model)`` -- use TransformerLens' forward; ``result.path`` says which.
    """
    validate_tokens(model, tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = model.W_U.device
    tokens = tokens.long()
    out = np.empty(len(tokens), dtype=np.float64)
    use_fast = (fastpath.fast_path_enabled() if fast is None else bool(fast)) and (
        fastpath.unsupported_reason(model) is None
    )
    n_fast = n_batches = 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(tokens), batch_size), desc=desc, disable=not progress, leave=False):
            batch = tokens[start : start + batch_size].to(device)
            nll = fastpath.fast_chunk_nll(model, batch, check=False) if use_fast else None
            n_fast += nll is not None
            n_batches += 1
            out[start : start + len(batch)] = (_chunk_nll(model, batch) if nll is None else nll).cpu().numpy()
    mean_nll = float(out.mean())
    return PerplexityResult(
        ppl=float(np.exp(mean_nll)),
        mean_nll=mean_nll,
        nll_per_chunk=out,
        n_tokens=int(tokens.shape[0] * (tokens.shape[1] - 1)),
        path="fast" if n_fast == n_batches else ("standard" if n_fast == 0 else "mixed"),
    )


def paired_ratio(
    base: PerplexityResult,
    other: PerplexityResult,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RatioCI:
    """``other.ppl / base.ppl`` with a paired bootstrap CI over chunks (same chunks in both)."""
    a, b = np.asarray(base.nll_per_chunk), np.asarray(other.nll_per_chunk)
    if a.shape != b.shape:
        raise ValueError(f"paired_ratio: results cover different chunks ({a.shape} vs {b.shape})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = b - a
    ratio = float(np.exp(diff.mean()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    boots = np.exp(diff[idx].mean(axis=1))
    alpha = (1 - confidence) / 2
    return RatioCI(ratio, float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha)), confidence)
