"""Decompositions of the heads: PCA, clustering, null spectra, storage counts, and plans (reconstructions to evaluate)."""
