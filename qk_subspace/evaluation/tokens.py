"""Evaluation tokens: WikiText-2 with the seed report's protocol, and generic text chunking.

Protocol (the report's "195 chunks x 1024 tokens"): the rows of the Hugging Face
``wikitext-2-raw-v1`` test split are joined with ``"\\n\\n"``, tokenized without a BOS token, cut to
the first ``n_tokens`` tokens, then to whole chunks of ``ctx`` tokens (200,000 -> 195 x 1024 =
199,680 tokens). With the GPT-2 tokenizer the full joined stream is 287,644 tokens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["chunk_text", "chunk_tokens", "encode", "load_wikitext2", "wikitext2_rows"]


def wikitext2_rows(split: str = "test", text_file: str | os.PathLike | None = None) -> list[str]:
    """Rows of WikiText-2 raw, from ``datasets`` or from a local ``wiki.<split>.raw`` file.

    A local file is split on ``"\\n"`` (the last, empty piece dropped); each line ``L`` becomes the
    row ``L + "\\n"`` if it has non-space characters, else ``""`` -- exactly the Hugging Face rows.
    """
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"text_file {str(path)!r} does not exist; pass an existing WikiText-2 raw file "
                "(e.g. ../shared/data/wikitext-2-raw/wiki.test.raw) or text_file=None to use `datasets`"
            )
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        return [line + "\n" if line.strip() else "" for line in lines]
    from ..model.loading import hub_reachable

    offline = not hub_reachable()  # then `datasets` may still have a local copy: read it without retries
    try:
        with _hub_offline(offline):
            from datasets import load_dataset

            ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as exc:
        where = "no network and no local copy" if offline else f"{type(exc).__name__}: {exc}"
        raise ConnectionError(
            f"could not load WikiText-2 ({split}) with `datasets` ({where}); give a local text with "
            "--text-file (Python: text_file=), e.g. a WikiText-2 wiki.test.raw or any plain-text file"
        ) from exc
    return list(ds["text"])


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put the Hugging Face hub and ``datasets`` in offline mode for the block (read at import, so patched)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE")]
    flags.append((datasets.config, "HF_DATASETS_OFFLINE"))
    old = [(mod, name, getattr(mod, name)) for mod, name in flags if hasattr(mod, name)]
    for mod, name, _ in old:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in old:
            setattr(mod, name, value)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS)."""
    if tokenizer is None:
        raise ValueError("tokenizer is None: text needs a tokenizer (the model has none; pass one)")
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def chunk_tokens(ids: list[int] | torch.Tensor, n_tokens: int | None, ctx: int) -> torch.Tensor:
    """Cut a token stream to its first ``n_tokens`` then to whole chunks: ``[n_chunks, ctx]`` long."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
    if n_tokens is not None and (
        isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < ctx
    ):
        raise ValueError(f"n_tokens must be an integer >= ctx={ctx}, got {n_tokens!r}")
    ids_t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if n_tokens is not None:
        ids_t = ids_t[:n_tokens]
    n_chunks = len(ids_t) // ctx
    if n_chunks == 0:
        raise ValueError(
            f"text is too short: {len(ids_t)} tokens, fewer than one chunk of ctx={ctx}; "
            "it needs at least ctx tokens"
        )
    return ids_t[: n_chunks * ctx].reshape(n_chunks, ctx).clone()


def chunk_text(tokenizer: Any, text: str, n_tokens: int | None = None, ctx: int = 1024) -> torch.Tensor:
    """Tokenize ``text`` (no BOS) and cut it into ``[n_chunks, ctx]`` chunks of the first ``n_tokens``."""
    if not isinstance(text, str) or not text.strip():
        shown = repr(text[:40]) if isinstance(text, str) else type(text).__name__
        raise ValueError(f"text must be a non-empty string with non-space characters, got {shown}")
    return chunk_tokens(encode(tokenizer, text), n_tokens, ctx)


def load_wikitext2(
    tokenizer: Any,
    split: str = "test",
    n_tokens: int | None = 200_000,
    ctx: int = 1024,
    text_file: str | os.PathLike | None = None,
) -> torch.Tensor:
    """WikiText-2 evaluation tokens ``[n_chunks, ctx]`` (long) with the report's protocol.

    Args:
        tokenizer: a Hugging Face tokenizer (e.g. ``model.tokenizer``).
        split: dataset split (``"test"``).
        n_tokens: keep the first ``n_tokens`` tokens of the joined stream (``None``: all).
        ctx: chunk length.
        text_file: a local ``wiki.test.raw``; gives the same tokens as the ``datasets`` route.
    """
    rows = wikitext2_rows(split, text_file)
    return chunk_text(tokenizer, "\n\n".join(rows), n_tokens, ctx)
