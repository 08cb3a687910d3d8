"""Plan generators: every sweep is a list of :class:`Plan` (a labelled reconstruction) for one engine.

A plan is one point of a sweep: the reconstruction of the heads to realise (a
:class:`~qk_subspace.representations.mixing.Mixing`) and the columns that describe it in the
results. :func:`qk_subspace.evaluation.sweep.run_sweep` evaluates any list of plans the same way
(edit, measure, restore, check K = all, stream rows). The generators here make the report's sweeps:

* :func:`topk_plans`: top-K components (variance order) or the first K of any ordering (importance);
* :func:`cluster_plans`: every head replaced by its k-means cluster representative;
* :func:`random_plans`: random K-dimensional subspaces (null baseline);
* :func:`drop_one_plans`: all components but one (drop-one importance).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..representations.mixing import FeatureProjection, Mixing
from .clustering import HeadClustering, check_positive_int, cluster_heads
from .pca import HeadPCA, validate_k
from .storage import pca_parameter_count

__all__ = ["Plan", "cluster_plans", "drop_one_plans", "random_plans", "topk_plans"]

#: ``"report"``: the report's K-sweep columns (``K``, ``n_components``, ``cumulative_variance`` as the sum
#: of the kept components' ratios); ``"space"``: also ``space``, ``groupby``, ``global_variance``,
#: ``n_params`` (the pooled/cumulative variance), for comparing spaces and groupings.
Columns = Literal["report", "space"]


@dataclass(frozen=True)
class Plan:
    """One point of a sweep.

    Attributes:
        label: short name (progress bars, resume keys), e.g. ``"K=10"``.
        mixing: the reconstruction to realise.
        columns: row columns written before the measurements (``K``, ``n_components``, ...).
        tail: row columns written after them (``is_all``, ``inertia``, ...).
    """

    label: str
    mixing: Mixing
    columns: dict[str, Any] = field(default_factory=dict)
    tail: dict[str, Any] = field(default_factory=dict)


def topk_plans(
    pca: HeadPCA,
    ks: Iterable[int],
    *,
    order: Sequence[int] | None = None,
    columns: Columns = "report",
    space: str | None = None,
) -> list[Plan]:
    """K keeps the first K components of ``order`` (default: variance order, the top-K).

    Args:
        pca: a fitted :class:`~qk_subspace.decomposition.pca.HeadPCA`.
        ks: K values in ``[0, pca.max_k_]``; 0 = mean head.
        order: a full ordering of the components (e.g. an importance ranking), or ``None``.
        columns: the row layout (see :data:`Columns`); ``space`` names the space in ``"space"`` rows.
    """
    ks = [validate_k(k, pca.max_k_) for k in ks]
    if not ks:
        raise ValueError(f"ks must contain at least one K in [0, {pca.max_k_}], got {ks!r}")
    n_groups = len(pca.groups_)
    plans = []
    for K in ks:
        n_comp = min(K, pca.n_components_)
        kept = list(order[:n_comp]) if order is not None else None
        mixing = pca.mixing(K=K) if kept is None else pca.mixing(components=kept)
        stored = pca_parameter_count(n_comp, pca.n_features_, pca.n_heads_, n_groups)
        if columns == "report":
            cols: dict[str, Any] = {
                "K": K,
                "n_components": n_comp,
                "cumulative_variance": pca.variance_of(kept if kept is not None else range(n_comp)),
            }
        else:
            cols = {
                "K": K,
                "space": space,
                "groupby": pca.groupby or "none",
                "n_components": n_comp,
                "cumulative_variance": pca.variance_explained(n_comp),
                "global_variance": pca.global_variance_explained(n_comp),
                "n_params": stored,
            }
        plans.append(Plan(f"K={K}", mixing, cols, {"is_all": mixing.is_identity, "stored_values": stored}))
    return plans


def cluster_plans(
    pca: HeadPCA,
    ks: Iterable[int],
    *,
    n_dims: int = 20,
    seed: int = 0,
    clusterings: Mapping[int, HeadClustering] | None = None,
) -> list[Plan]:
    """Every head replaced by its cluster representative, for each cluster count ``k < n_heads``.

    Values of ``k >= n_heads`` are dropped (nothing would be replaced); others must be integers >= 1.
    ``clusterings`` may hold results of :func:`~qk_subspace.decomposition.clustering.cluster_heads` with the
    same ``n_dims`` and ``seed`` to reuse. The plan's tail holds ``inertia``, ``representatives`` (labels)
    and ``assignments``.
    """
    n = pca.n_heads_
    ks = [k for k in (check_positive_int(k, "ks") for k in ks) if k < n]
    if not ks:
        raise ValueError(
            f"ks: no cluster count below n_heads={n} to evaluate (k >= n_heads replaces nothing)"
        )
    plans = []
    for k in ks:
        cl = (clusterings or {}).get(k) or cluster_heads(pca, k, n_dims=n_dims, seed=seed)
        tail = {
            "inertia": cl.inertia,
            "representatives": cl.representative_labels(),
            "assignments": cl.assignments.tolist(),
            "stored_values": int(k * pca.n_features_ + n),  # the representatives and every head's choice
        }
        plans.append(Plan(f"k={k}", cl.mixing(), {"k": int(k), "replaced": cl.n_replaced}, tail))
    return plans


def random_plans(
    pca: HeadPCA,
    ks: Iterable[int],
    *,
    n_seeds: int = 3,
    rng: np.random.Generator,
    within: Literal["span", "ambient"] = "span",
    space: str | None = None,
) -> list[Plan]:
    """``n_seeds`` random K-dimensional subspaces per K (drawn from ``rng`` in K-major order).

    ``within="span"``: inside the span of each group's centred heads
    (:meth:`~qk_subspace.decomposition.pca.HeadPCA.random_mixing`, expected variance kept ``K / r``);
    ``"ambient"``: in the whole feature space (head-space representations only, expected ``K / D``).
    Columns: ``K``, ``seed``, ``space``, ``groupby``, ``within``, ``variance`` (fraction kept).
    """
    if within not in ("span", "ambient"):
        raise ValueError(f"within must be 'span' or 'ambient', got {within!r}")
    plans = []
    for K in ks:
        K = validate_k(K, pca.max_k_)
        stored = pca_parameter_count(K, pca.n_features_, pca.n_heads_, len(pca.groups_))
        for s in range(n_seeds):
            mixing, kept = random_ambient(pca, K, rng) if within == "ambient" else pca.random_mixing(K, rng)
            cols = {"K": K, "seed": s, "space": space, "groupby": pca.groupby or "none", "within": within}
            plans.append(
                Plan(f"rand K={K} s={s}", mixing, {**cols, "variance": kept}, {"stored_values": stored})
            )
    return plans


def random_ambient(pca: HeadPCA, K: int, rng: np.random.Generator) -> tuple[FeatureProjection, float]:
    """A Haar-random K-dim subspace of the feature space for the fitted heads; ``(projection, variance kept)``."""
    X = pca.heads_.features
    if X is None:
        raise ValueError(
            "within='ambient' is only available for head-space representations (qk, qk-canonical, ov): "
            "the d_model^2 circuit space is too large"
        )
    Q, _ = np.linalg.qr(rng.standard_normal((X.shape[1], max(K, 1))))
    Q = Q[:, :K]
    Xc = X - X.mean(axis=0)
    P = Xc @ Q
    tot = float(np.sum(Xc**2))
    return FeatureProjection(len(X), Q), float(np.sum(P**2)) / tot if tot > 0 else 0.0


def drop_one_plans(pca: HeadPCA, components: Sequence[int]) -> list[Plan]:
    """For each component ``j``: every head rebuilt from the mean and all components except ``j``."""
    evr = pca.explained_variance_ratio_
    plans = []
    for j in components:
        keep = [c for c in range(pca.n_components_) if c != int(j)]
        cols = {"component": int(j), "explained_variance_ratio": float(evr[j])}
        plans.append(Plan(f"drop {j}", pca.mixing(components=keep), cols))
    return plans
