"""The embedded model: llama2.c's pretrained ``stories260K``, shipped in the package with its own tokens.

``qs.load_model("stories260K")`` (and ``qk-subspace run`` without ``--model``) loads it from the package,
with no network and no data beside the package. It is a real pretrained Llama-style model (Andrej
Karpathy's llama2.c, MIT licence, ``qk_subspace/data/stories260K/LICENSE``): 5 layers x 8 query heads,
4 key/value heads (grouped-query attention), rotary positions, d_head 8, vocabulary 512, context 512.

The package contains no third-party text. The model is evaluated on text it sampled itself
(``tools/make_embedded_tokens.py``: BOS then the model's own next-token distribution, temperature 1,
seed 0), shipped as token ids: ``[2 * EVAL_SEQUENCES, SEQ_LEN]`` uint16, the first ``EVAL_SEQUENCES``
rows for perplexity, the rest for side batches (diagnostics, importance ranking).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "EMBEDDED_DIR",
    "EMBEDDED_NAME",
    "EVAL_SEQUENCES",
    "SEQ_LEN",
    "embedded_tokens",
    "evaluation_chunks",
    "is_embedded",
    "is_embedded_name",
]

#: The name ``load_model`` and the CLI resolve to the embedded model.
EMBEDDED_NAME = "stories260K"
#: Where the embedded checkpoint lives (a Hugging Face Llama directory).
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "data" / EMBEDDED_NAME
#: Sequences of the embedded evaluation set used for perplexity; as many again follow for side batches.
EVAL_SEQUENCES = 128
#: Tokens per sampled sequence (BOS included).
SEQ_LEN = 256


def is_embedded_name(name: Any) -> bool:
    """Whether ``name`` asks for the embedded model: its name (not an existing path of that name)."""
    return isinstance(name, str) and name.lower() == EMBEDDED_NAME.lower() and not Path(name).exists()


def is_embedded(model: Any) -> bool:
    """Whether a loaded model is the embedded one (as recorded by ``load_model``)."""
    return getattr(model, "qk_subspace_embedded", None) == EMBEDDED_NAME


def embedded_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """``(perplexity stream, side stream)``: the embedded model's own samples as 1-D long tensors."""
    import numpy as np
    import torch

    path = EMBEDDED_DIR / "tokens.npy"
    if not path.is_file():
        raise FileNotFoundError(
            f"the embedded evaluation tokens {str(path)!r} are missing from the installation"
        )
    ids = torch.from_numpy(np.load(path).astype(np.int64))
    return ids[:EVAL_SEQUENCES].flatten(), ids[EVAL_SEQUENCES:].flatten()


def evaluation_chunks(n_chunks: int | None = None) -> torch.Tensor:
    """The first ``n_chunks`` (default all ``EVAL_SEQUENCES``) perplexity sequences ``[n_chunks, SEQ_LEN]``."""
    evaluation, _ = embedded_tokens()
    chunks = evaluation.reshape(EVAL_SEQUENCES, SEQ_LEN)
    if n_chunks is None:
        return chunks
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or not 1 <= n_chunks <= EVAL_SEQUENCES:
        raise ValueError(f"n_chunks must be an integer in [1, {EVAL_SEQUENCES}], got {n_chunks!r}")
    return chunks[:n_chunks].clone()
