"""Evaluation: perplexity and tokens, the sweep engine and the sweeps, diagnostics, importance, the gauge study."""

from .._lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__)
