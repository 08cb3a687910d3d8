"""The inputs of a run: evaluation tokens and the side batches, and the names things are saved under."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..evaluation.diagnostics import diagnostic_batch
from ..evaluation.tokens import chunk_tokens, encode, wikitext2_rows
from ..model.embedded import EMBEDDED_NAME, SEQ_LEN, embedded_tokens, is_embedded
from .config import ExperimentConfig

__all__ = [
    "evaluation_tokens",
    "load_tokens",
    "model_display_name",
    "sha256_file",
    "sha256_tokens",
    "side_tokens",
    "token_stream",
]


def model_display_name(model: Any) -> str:
    """Name used in file names: a local directory's basename, an official name as given."""
    if not isinstance(model, (str, os.PathLike)):
        name = str(model.cfg.model_name)  # a bridge's is the checkpoint directory it was booted from
        if is_embedded(model):
            name = EMBEDDED_NAME
        elif Path(name).is_dir():
            name = Path(name).resolve().name
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


def token_stream(model: Any, config: ExperimentConfig) -> tuple[torch.Tensor, int | None, dict[str, Any]]:
    """The run's whole token stream (1-D), how much of it perplexity may use (``None``: all), and the protocol.

    The embedded model without ``text_file`` uses its own samples (:mod:`qk_subspace.model.embedded`):
    the evaluation part, then the side part. Otherwise: the text file, or WikiText-2 via ``datasets``,
    tokenized without BOS (WikiText-2 rows joined with blank lines).
    """
    if config.text.text_file is None and is_embedded(model):
        evaluation, side = embedded_tokens()
        protocol: dict[str, Any] = {
            "text": f"{EMBEDDED_NAME} samples (text the model generated itself, seed 0)",
            "route": "embedded",
            "joined_with": "sequences of 256 tokens, each from BOS",
        }
        return torch.cat([evaluation, side]), len(evaluation), protocol
    if model.tokenizer is None:
        raise ValueError(
            "the model has no tokenizer; give run_experiment tokens=... or a checkpoint with tokenizer files"
        )
    if config.text.text_file is None:
        rows = wikitext2_rows(config.text.split)
        protocol = {
            "text": "wikitext-2-raw-v1",
            "route": "datasets",
            "split": config.text.split,
            "joined_with": "\n\n",
        }
        return torch.tensor(encode(model.tokenizer, "\n\n".join(rows)), dtype=torch.long), None, protocol
    path = Path(config.text.text_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text_file (--text-file) {str(path)!r} does not exist")
    wikitext = config.text.text_format == "wikitext" or (
        config.text.text_format == "auto" and re.fullmatch(r"wiki\..+\.raw", path.name) is not None
    )
    if wikitext:
        text = "\n\n".join(wikitext2_rows(text_file=path))
        protocol = {"text": "wikitext-2-raw-v1", "route": "file", "joined_with": "\n\n"}
    else:
        text = path.read_text(encoding="utf-8")
        protocol = {"text": path.name, "route": "plain text file"}
        if not text.strip():
            raise ValueError(f"text_file (--text-file) {str(path)!r} has no text")
    protocol.update(text_file=str(config.text.text_file), text_sha256=sha256_file(path))
    return torch.tensor(encode(model.tokenizer, text), dtype=torch.long), None, protocol


def evaluation_tokens(model: Any, config: ExperimentConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The evaluation tokens ``[n_chunks, ctx]`` of ``config`` (the stream's first ``n_tokens``, whole chunks).

    ``ctx`` defaults to ``min(1024, n_ctx)``; on the embedded samples, to their sequence length (256),
    so every chunk is one sampled sequence from its BOS.
    """
    stream, limit, described = token_stream(model, config)
    default_ctx = SEQ_LEN if described["route"] == "embedded" else min(1024, int(model.cfg.n_ctx))
    ctx = config.text.ctx if config.text.ctx is not None else default_ctx
    protocol: dict[str, Any] = {
        "ctx": ctx,
        "n_tokens_requested": config.text.n_tokens,
        "bos": limit is not None,
    }
    protocol.update(described)
    return chunk_tokens(stream[:limit], config.text.n_tokens, ctx), protocol


def load_tokens(
    model: Any,
    text_file: str | os.PathLike | None = None,
    n_tokens: int | None = None,
    ctx: int | None = None,
) -> torch.Tensor:
    """Evaluation tokens ``[n_chunks, ctx]`` as ``qk-subspace run`` cuts them (for scripts and demos).

    ``text_file`` as ``--text-file`` (a ``wiki.*.raw`` file gives the WikiText-2 protocol); ``None``: the
    embedded model's own samples for the embedded model, WikiText-2 via ``datasets`` otherwise.
    """
    changes = {"text_file": None if text_file is None else str(text_file), "n_tokens": n_tokens, "ctx": ctx}
    return evaluation_tokens(model, ExperimentConfig().replace(**changes))[0]


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
    full, _, _ = token_stream(model, config)
    stream = full[n_used:]
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
