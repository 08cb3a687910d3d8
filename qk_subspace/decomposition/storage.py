"""How many numbers a PCA reconstruction stores (to compare groupings and representations fairly).

A representation with ``D`` numbers per head stores, for a global PCA with K components, ``D`` (the
mean head) + ``K D`` (the components) + ``n K`` (the coefficients of the ``n`` heads); a per-layer PCA
stores ``n_layers (D + K D) + n K``.
"""

from __future__ import annotations

__all__ = ["matched_global_k", "pca_parameter_count"]


def pca_parameter_count(K: int, D: int, n_heads_total: int, n_groups: int = 1) -> int:
    """Numbers stored by a PCA reconstruction: ``n_groups (D + K D)`` (means, components) ``+ n K``."""
    return int(n_groups * (D + K * D) + n_heads_total * K)


def matched_global_k(K_group: int, D: int, n_heads_total: int, n_groups: int, max_k: int) -> int:
    """Largest global K whose parameter count does not exceed per-group PCA with ``K_group`` per group."""
    budget = pca_parameter_count(K_group, D, n_heads_total, n_groups)
    K = (budget - D) // (D + n_heads_total)
    return int(max(0, min(K, max_k)))
