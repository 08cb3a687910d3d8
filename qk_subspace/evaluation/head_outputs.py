"""How much every head's output changes under an edit: the diagnostic of OV edits (and QK edits too).

Attention patterns do not depend on ``W_V``, so an OV edit leaves them untouched; what it changes is
each head's mixed values ``z`` (``hook_z``, ``[.., d_head]``) and its residual write ``z W_O``
(``[.., d_model]``). :func:`head_output_change` compares both, per head, with and without an edit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .perplexity import validate_tokens

__all__ = ["head_output_change"]


def head_output_change(
    model: Any,
    tokens: torch.Tensor,
    edit: Callable[[], AbstractContextManager],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Relative change of every head's output under an edit (total effect, through earlier layers too).

    Args:
        model: the model.
        tokens: ``[n_chunks, ctx]``.
        edit: zero-argument callable returning a fresh edit context manager, e.g.
            ``lambda: qs.inject_ov(model, target)`` (works for QK edits too).
        batch_size: chunks per forward pass.

    Returns:
        ``{"z": [n_layers, n_heads], "write": [n_layers, n_heads]}`` float64:
        ``||z_edit - z|| / ||z||`` over all chunks and positions (``hook_z``, ``[.., d_head]``), and
        the same for the residual write ``z W_O`` (``[.., d_model]``; ``W_O`` of the unedited model,
        which QK and OV edits do not change).
    """
    validate_tokens(model, tokens)
    cfg = model.cfg
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    W_O = torch.stack([b.attn.W_O.detach() for b in model.blocks])  # [n_layers, n_heads, d_head, d_model]
    sums = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in ("dz", "z", "dw", "w")}
    device = model.W_U.device

    def run() -> list[torch.Tensor]:
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
        return [cache[n].double() for n in names]  # each [b, pos, n_heads, d_head]

    with torch.no_grad():
        for start in tqdm(
            range(0, len(tokens), batch_size), desc="head outputs", disable=not progress, leave=False
        ):
            batch = tokens[start : start + batch_size].long().to(device)
            base = run()
            with edit():
                edited = run()
            for layer, (z0, z1) in enumerate(zip(base, edited, strict=False)):
                w0 = torch.einsum("bphd,hdm->bphm", z0, W_O[layer].double())
                w1 = torch.einsum("bphd,hdm->bphm", z1, W_O[layer].double())
                sums["dz"][layer] += ((z1 - z0) ** 2).sum(dim=(0, 1, 3)).cpu().numpy()
                sums["z"][layer] += (z0**2).sum(dim=(0, 1, 3)).cpu().numpy()
                sums["dw"][layer] += ((w1 - w0) ** 2).sum(dim=(0, 1, 3)).cpu().numpy()
                sums["w"][layer] += (w0**2).sum(dim=(0, 1, 3)).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "z": np.sqrt(sums["dz"] / sums["z"]),
            "write": np.sqrt(sums["dw"] / sums["w"]),
        }
