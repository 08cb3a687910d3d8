"""A tiny GPT-2 checkpoint directory with its own word-level tokenizer, and a text file, for CLI tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "big",
    "small",
    "red",
    "blue",
    "house",
    "tree",
    "and",
    "then",
    "it",
    "was",
    "happy",
    "sad",
    "day",
    "night",
    "bird",
    "saw",
    "fish",
    "swam",
    "river",
    "green",
    "old",
    "new",
    "little",
    "girl",
    "boy",
    "friend",
    "played",
    "with",
    "ball",
    "went",
    "home",
]


def write_text(path: Path, n_words: int = 6000, seed: int = 0) -> Path:
    """A deterministic pseudo-random word text (about ``n_words`` tokens)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(_WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(_WORDS[i] for i in idx[j : j + 12]) + " ." for j in range(0, n_words, 12)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def save_tiny_gpt2(
    path: Path,
    text: str,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 32,
    n_positions: int = 64,
    seed: int = 0,
) -> Path:
    """Save a random GPT-2 (``n_layer x n_head`` heads, vocab 100) plus a tokenizer trained on ``text``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [text], trainers.WordLevelTrainer(vocab_size=100, special_tokens=["<unk>", "<eos>"])
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>", pad_token="<eos>"
    ).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=100,
        bos_token_id=1,
        eos_token_id=1,
        initializer_range=0.3,
    )  # large weights: attention patterns (and QK edits) matter
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf["architectures"] = ["GPT2LMHeadModel"]  # TransformerLens' config conversion needs both keys
    conf["n_ctx"] = n_positions
    (path / "config.json").write_text(json.dumps(conf))
    return path


def cli_run_args(
    model_dir: Path,
    text: Path,
    *,
    n_tokens: int,
    ctx: int,
    ks: str,
    cluster_ks: str,
    n_dims: int,
    n_boot: int,
) -> list[str]:
    """``qk-subspace run`` arguments for a small, fast run of the tiny model (no PNG, no progress bars)."""
    return [
        "run",
        "--model", str(model_dir),
        "--text-file", str(text),
        "--n-tokens", str(n_tokens),
        "--ctx", str(ctx),
        "--batch-size", "16",
        "--ks", ks,
        "--cluster-ks", cluster_ks,
        "--n-dims", str(n_dims),
        "--gate-k", "2",
        "--n-boot", str(n_boot),
        "--no-png",
        "--no-progress",
    ]  # fmt: skip


def tiny_cli_setup(directory: Path, n_words: int, **run: Any) -> tuple[Path, Path, list[str]]:
    """A text of ``n_words`` words and a tiny GPT-2 trained on it in ``directory``, with the
    ``qk-subspace run`` arguments of :func:`cli_run_args` (``run``: its keyword options)."""
    text = write_text(directory / "stories.txt", n_words=n_words)
    model_dir = save_tiny_gpt2(directory / "tiny", text.read_text())
    return model_dir, text, cli_run_args(model_dir, text, **run)
