"""Edits of the weights: the one writer (ParameterEdit) and the edits built on it (QK, OV, circuit, gauge)."""

from .._lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__)
