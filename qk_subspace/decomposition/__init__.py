"""Decompositions of the heads: PCA, clustering, null spectra, storage counts, and plans (reconstructions to evaluate)."""

from .._lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__)
