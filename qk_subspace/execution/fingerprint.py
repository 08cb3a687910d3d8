"""A cheap fingerprint of a model's weights: workers that load their own copy check it is the same.

A sweep is evaluated on the model in a given weight state (loaded, then e.g. inside a canonical
gauge). A worker reproduces that state from the load arguments and the representation's context; if
it did not (another checkpoint on the worker's disk, a model the caller edited by hand), its rows would
be silently different. The fingerprint -- SHA-256 over every parameter's name, shape, dtype and a
strided sample of at most 4096 of its values -- tells them apart at negligible cost.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["weights_fingerprint"]

_SAMPLE = 4096


def weights_fingerprint(model: Any) -> str:
    """SHA-256 (hex) of ``model``'s parameters (names, shapes, dtypes, a strided sample of values)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()
