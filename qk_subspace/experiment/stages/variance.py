"""6A: the cumulative explained variance of the main PCA and the components needed per threshold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...decomposition.pca import HeadPCA
from ..context import RunContext
from .base import Stage

__all__ = ["VARIANCE_THRESHOLDS", "VarianceStage", "variance_summary"]

#: Cumulative-variance thresholds of the report's 6A table.
VARIANCE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)


def variance_summary(
    pca: HeadPCA, thresholds: Sequence[float] = VARIANCE_THRESHOLDS, top: int = 3
) -> dict[str, Any]:
    """The report's 6A numbers of a fitted global PCA: components per threshold, top ratios, the curves."""
    n = pca.n_heads_
    cum = pca.cumulative_variance_
    return {
        "n_heads": n,
        "n_features": int(pca.n_features_),
        "n_components": pca.n_components_,
        "n_nonzero_components": pca.n_nonzero_components_,
        "thresholds": [
            {
                "threshold": float(t),
                "K": pca.n_components_for(t),
                "fraction_of_heads": pca.n_components_for(t) / n,
            }
            for t in thresholds
        ],
        "top_ratios": [float(r) for r in pca.explained_variance_ratio_[:top]],
        "top_cumulative": float(cum[min(top, len(cum)) - 1]),
        "pc12_cumulative": float(cum[min(2, len(cum)) - 1]),
        "explained_variance_ratio": np.asarray(pca.explained_variance_ratio_).tolist(),
        "cumulative_variance": np.asarray(cum).tolist(),
    }


class VarianceStage(Stage):
    name = "variance"
    figures = ("variance",)

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        data["variance"] = variance_summary(ctx.pca)
