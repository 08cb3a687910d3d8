"""The inputs of a run: evaluation tokens and the side batches, and the names things are saved under."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..evaluation.diagnostics import diagnostic_batch
from ..evaluation.tokens import chunk_text, chunk_tokens, load_wikitext2
from .config import ExperimentConfig

__all__ = ["evaluation_tokens", "model_display_name", "sha256_file", "sha256_tokens", "side_tokens"]


def model_display_name(model: Any) -> str:
    """Name used in file names: a local directory's basename, an official name as given."""
    if not isinstance(model, (str, os.PathLike)):
        name = str(model.cfg.model_name)
    else:
        p = Path(model).expanduser()
        name = p.resolve().name if p.is_dir() else str(model)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tokens(tokens: torch.Tensor) -> str:
    arr = tokens.detach().cpu().to(torch.int64).numpy()
    return hashlib.sha256(repr(tuple(arr.shape)).encode() + arr.tobytes()).hexdigest()


def evaluation_tokens(model: Any, config: ExperimentConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The evaluation tokens ``[n_chunks, ctx]`` of ``config`` and a description of the protocol."""
    ctx = config.text.ctx if config.text.ctx is not None else min(1024, int(model.cfg.n_ctx))
    if model.tokenizer is None:
        raise ValueError(
            "the model has no tokenizer; give run_experiment tokens=... or a checkpoint with tokenizer files"
        )
    protocol: dict[str, Any] = {"ctx": ctx, "n_tokens_requested": config.text.n_tokens, "bos": False}
    if config.text.text_file is None:
        tokens = load_wikitext2(
            model.tokenizer, split=config.text.split, n_tokens=config.text.n_tokens, ctx=ctx
        )
        protocol.update(
            text="wikitext-2-raw-v1", route="datasets", split=config.text.split, joined_with="\n\n"
        )
        return tokens, protocol
    path = Path(config.text.text_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text_file {str(path)!r} does not exist")
    wikitext = config.text.text_format == "wikitext" or (
        config.text.text_format == "auto" and re.fullmatch(r"wiki\..+\.raw", path.name) is not None
    )
    if wikitext:
        tokens = load_wikitext2(model.tokenizer, n_tokens=config.text.n_tokens, ctx=ctx, text_file=path)
        protocol.update(text="wikitext-2-raw-v1", route="file", joined_with="\n\n")
    else:
        tokens = chunk_text(model.tokenizer, path.read_text(encoding="utf-8"), config.text.n_tokens, ctx)
        protocol.update(text=path.name, route="plain text file")
    protocol.update(text_file=str(config.text.text_file), text_sha256=sha256_file(path))
    return tokens, protocol


def side_tokens(
    model: Any, config: ExperimentConfig, n_used: int, ctx: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """The diagnostic batch and the importance-ranking tokens, cut from the config's text *after* the
    first ``n_used`` tokens (those of the perplexity sweep), so neither overlaps the sweep.

    Returns:
        ``(diag_tokens [diag_seqs, diag_ctx] or None, rank_tokens [n, ctx] or None, description)``:
        the diagnostic batch comes first in the remaining stream, the ranking tokens
        (``importance_tokens``, cut to whole chunks of ``ctx``) right after it. ``None`` when the
        config does not need them (``diagnostics`` off / ``order="variance"``).
    """
    want_diag, want_rank = config.circuits.diagnostics, config.circuits.order == "importance"
    if not (want_diag or want_rank):
        return None, None, {}
    full, _ = evaluation_tokens(model, config.replace(n_tokens=None, ctx=2))
    stream = full.flatten()[n_used:]
    diag = rank = None
    info: dict[str, Any] = {"offset": n_used, "available": len(stream)}
    hint = "lower --n-tokens (the perplexity tokens) or use a longer text"
    if want_diag:
        need = config.circuits.diag_seqs * config.circuits.diag_ctx
        if len(stream) < need:
            raise ValueError(
                f"diagnostics need {config.circuits.diag_seqs} x {config.circuits.diag_ctx} = {need} tokens after the {n_used} "
                f"perplexity tokens; the text has {len(stream)} more: {hint}, or lower --diag-seqs/--diag-ctx"
            )
        diag = diagnostic_batch(stream, config.circuits.diag_seqs, config.circuits.diag_ctx)
    rest = stream[0 if diag is None else diag.numel() :]
    if want_rank:
        if len(rest) < max(config.circuits.importance_tokens, ctx):
            raise ValueError(
                f"importance ranking needs importance_tokens={config.circuits.importance_tokens} tokens (at least one "
                f"chunk of {ctx}) not used by the sweep; the text has {len(rest)} left: {hint}, "
                "or lower --importance-tokens"
            )
        rank = chunk_tokens(rest, config.circuits.importance_tokens, ctx)
    return diag, rank, info
