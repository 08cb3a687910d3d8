"""Sample the embedded model's evaluation tokens from the model itself (run once; the ids are shipped).

    python tools/make_embedded_tokens.py      # writes qk_subspace/data/stories260K/tokens.npy

The package ships no third-party text: the embedded stories260K model (llama2.c, MIT) is evaluated on
text it generates itself. Every sequence starts with BOS and continues with tokens drawn from the
model's own next-token distribution (temperature 1, no top-k/top-p), from a fixed seed. The array is
``[N_SEQUENCES, SEQ_LEN]`` uint16: the first ``EVAL_SEQUENCES`` rows are the perplexity tokens, the rest
the side batches (diagnostics, importance ranking).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qk_subspace.model.embedded import EMBEDDED_DIR, EVAL_SEQUENCES, SEQ_LEN  # noqa: E402

N_SEQUENCES = 2 * EVAL_SEQUENCES
SEED = 0
BATCH = 64


def sample(model: torch.nn.Module, n: int, length: int, bos: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens: BOS, then samples of the model's next-token distribution."""
    out = torch.full((n, 1), bos, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(length - 1):
            logits = model(out, return_type="logits")[:, -1].double()
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
            out = torch.cat([out, nxt], dim=1)
    return out


def main() -> None:
    import qk_subspace as qs

    model = qs.load_model(EMBEDDED_DIR)
    bos = int(model.tokenizer.bos_token_id)
    gen = torch.Generator().manual_seed(SEED)
    parts = [sample(model, BATCH, SEQ_LEN, bos, gen) for _ in range(N_SEQUENCES // BATCH)]
    tokens = torch.cat(parts).numpy().astype(np.uint16)
    path = EMBEDDED_DIR / "tokens.npy"
    np.save(path, tokens)
    print(
        f"wrote {path}: {tokens.shape}, first sequence: {model.tokenizer.decode(tokens[0, :40].tolist())!r}"
    )


if __name__ == "__main__":
    main()
