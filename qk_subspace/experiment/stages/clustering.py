"""6C: every head replaced by its k-means cluster representative (one point per k), and the 2D map."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...decomposition.clustering import KMEANS_N_INIT, HeadClustering, cluster_heads
from ...decomposition.pca import HeadPCA
from ...decomposition.plans import cluster_plans
from ...evaluation.sweep import run_sweep
from ...model.heads import head_index, head_labels
from ..context import RunContext
from ..store import jsonable
from .base import PointLog, Stage

__all__ = ["ClusteringStage", "pca_map_rows"]


def pca_map_rows(pca: HeadPCA, clustering: HeadClustering | None = None) -> list[dict[str, Any]]:
    """Every head's first two PCA coordinates with its layer, head, label and (optional) cluster."""
    n_layers, n_heads = pca.head_shape_[0], int(np.prod(pca.head_shape_[1:]))
    labels = head_labels(n_layers, n_heads)
    clusters = (
        clustering.assignments.reshape(-1).tolist() if clustering is not None else [None] * pca.n_heads_
    )
    c = pca.coefficients_
    return [
        {
            "label": labels[i],
            "layer": layer,
            "head": head,
            "pc1": float(c[i, 0]),
            "pc2": float(c[i, 1]) if c.shape[1] > 1 else 0.0,
            "cluster": clusters[i],
        }
        for i, (layer, head) in enumerate(head_index(n_layers, n_heads))
    ]


class ClusteringStage(Stage):
    name = "clustering"
    figures = ("clustering",)

    def setup(self, ctx: RunContext, data: dict[str, Any]) -> None:
        s = ctx.config.sweeps
        ctx.clusterings = {
            k: cluster_heads(ctx.pca, k, n_dims=ctx.n_dims, seed=s.seed) for k in ctx.cluster_ks
        }
        old = data.get("clustering") or {}
        data["clustering"] = {
            "n_dims": ctx.n_dims,
            "seed": s.seed,
            "kmeans_n_init": KMEANS_N_INIT,
            "dropped_k": ctx.dropped,
            "rows": old.get("rows", []),
            "assignments": {str(k): c.assignments.tolist() for k, c in ctx.clusterings.items()},
            "representatives": {str(k): c.representative_labels() for k, c in ctx.clusterings.items()},
        }
        data["pca_map"] = pca_map_rows(
            ctx.pca, ctx.clusterings.get(ctx.map_k) if ctx.map_k is not None else None
        )

    def total(self, ctx: RunContext) -> int:
        return len(ctx.cluster_ks)

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        return len(data["clustering"]["rows"])

    def sort(self, data: dict[str, Any]) -> None:
        data["clustering"]["rows"].sort(key=lambda r: r["k"])

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        done = {int(r["k"]) for r in data["clustering"]["rows"]}
        todo = [k for k in ctx.cluster_ks if k not in done]
        if not todo:
            return

        def on_row(row: dict[str, Any]) -> None:
            row = {k: v for k, v in row.items() if k not in ("assignments", "representatives")}
            data["clustering"]["rows"].append(jsonable(row))
            log.finish(f"cluster_k={row['k']}")

        s, rep = ctx.config.sweeps, ctx.representation
        plans = cluster_plans(ctx.pca, todo, n_dims=ctx.n_dims, seed=s.seed, clusterings=ctx.clusterings)
        log.start()
        with rep.context(ctx.model):
            run_sweep(
                ctx.model, ctx.tokens, rep, ctx.heads, plans, baseline=ctx.baseline, seed=s.seed, on_row=on_row,
                desc="cluster sweep", **ctx.sweep_options(), executor=ctx.executor,
            )  # fmt: skip

    def checks(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        rows = data["clustering"]["rows"]
        return {"replaced_equals_n_heads_minus_k": all(r["replaced"] == ctx.n - r["k"] for r in rows)}
