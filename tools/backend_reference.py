"""Record (on HookedTransformer) or compute (on any backend) the cross-backend reference of stories260K.

    python tools/backend_reference.py record     # transformer-lens 3.x: write tests/golden/backends.json
    python tools/backend_reference.py show       # the same figures on this installation's default backend

The reference pins what must not depend on the TransformerLens class a model is loaded into:
every head's ``W_QK`` (Frobenius norm and singular values, which fix the matrix up to rotations of
its two sides), the perplexity of 16 TinyStories chunks of 256 tokens, and the perplexity with the
heads rebuilt from K = 10 and K = all PCA components. ``tests/test_backends.py`` compares a bridge
with it (and, on transformer-lens 3.x, with a live HookedTransformer). Needs ``../shared``.
It holds no weights: 40 norms, 320 singular values and three perplexities.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "tinystories" / "tinystories_val.txt"
REFERENCE = ROOT / "tests" / "golden" / "backends.json"
N_CHUNKS, CTX, K = 16, 256, 10


def tokens(model: Any) -> Any:
    import qk_subspace as qs

    return qs.chunk_text(model.tokenizer, TEXT.read_text()[:200_000], n_tokens=N_CHUNKS * CTX, ctx=CTX)


def figures(model: Any) -> dict[str, Any]:
    """The reference figures of ``model`` (float64 where the package computes in float64)."""
    import torch

    import qk_subspace as qs

    W = qs.qk_matrices(model)  # [n_layers, n_heads, d_head, d_head] float64
    toks = tokens(model)
    pca = qs.HeadPCA().fit(W)
    base = qs.perplexity(model, toks, progress=False)
    out: dict[str, Any] = {
        "qk_norms": W.flatten(0, 1).norm(dim=(-1, -2)).tolist(),
        "qk_singular_values": torch.linalg.svdvals(W.flatten(0, 1)).tolist(),
        "ppl": base.ppl,
    }
    for name, k in (("ppl_K10", K), ("ppl_K_all", pca.n_heads_)):
        with qs.inject_qk(model, pca.reconstruct(k)):
            out[name] = qs.perplexity(model, toks, progress=False).ppl
    return out


def main(argv: list[str]) -> int:
    if argv[:1] not in (["record"], ["show"]):
        print(__doc__)
        return 2
    import qk_subspace as qs

    backend = "hooked" if argv[0] == "record" else "auto"
    model = qs.load_model(MODEL, backend=backend)
    data = {"model": "stories260K", "backend": qs.model.backends.name_of(model), **figures(model)}
    if argv[0] == "record":
        REFERENCE.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {REFERENCE}")
    else:
        print(json.dumps({k: v for k, v in data.items() if not k.startswith("qk_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
