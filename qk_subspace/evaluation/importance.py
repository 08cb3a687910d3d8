"""Function-aware importance of principal components and of heads.

PCA orders components by the variance of the circuit matrices across heads; the seed report's
central finding is that this is not what the model needs (GPT-2 small: components 131-140 carry
0.6 % of the variance but take perplexity from 2.2x to 1.07x). This module measures importance
directly.

* ``method="drop_one"``: for each component ``j`` rebuild every head from the mean and all
  components except ``j``, inject (exactly, see :mod:`qk_subspace.edits.qk` / :mod:`qk_subspace.edits.ov`),
  and measure the perplexity change, with a paired bootstrap CI over chunks.
* ``method="gradient"``: per chunk, one forward and one backward pass give ``dL/dT`` for every
  head's circuit matrix ``T``; removing component ``j`` changes head h's matrix by
  ``Delta_hj = -c_hj V_j`` (``c`` the PCA coefficients, ``V_j`` the component as a ``d x d``
  matrix), so the first-order (Taylor) estimate of the loss change is ``<dL/dT, Delta_j>`` and the
  empirical-Fisher score is ``(1/2) mean_chunks <dL_b/dT, Delta_j>^2``.

Gradient with respect to a head's circuit matrix. The model sees ``T = W_QK`` only through the
injection map that edits ``W_Q`` (:func:`qk_subspace.inject_qk`):

    W_Q(T) = W_Q + U G^{-1} (T - W_Q^T U)^T,     U = W_K,  G = U^T U      # U: [d_model, d_head]

so ``dW_Q = U G^{-1} dT^T`` and, with ``g = dL/dW_Q`` (``[d_model, d_head]``, from autograd) and
``<A, B> = tr(A^T B) = tr(A B^T)``,

    dL = <g, U G^{-1} dT^T> = tr(g^T U G^{-1} dT^T) = <g^T U G^{-1}, dT>

    =>  dL/dT = g^T U G^{-1} = (G^{-1} U^T g)^T                             # [d_head, d_head]

(note the transpose: ``G^{-1} U^T g`` is ``(dL/dT)^T``). At the unedited weights the injection
map is the identity, so this is the derivative of the loss along exactly the edits we evaluate.
The OV circuit (:mod:`qk_subspace.edits.ov`) is the same with ``g = dL/dW_V`` and ``U = W_O^T``; for
grouped-query models ``W_V`` is shared by the ``r`` query heads of a group and the injection
solves them jointly, ``dW_V = U_g G_g^{-1} dR_g^T`` with ``U_g = [U_h1 | ... | U_hr]`` and
``R_g = [T_h1 - ... | ... | T_hr - ...]``, hence ``dL/dR_g = (G_g^{-1} U_g^T g)^T``
(``[d_head, r d_head]``), whose ``k``-th ``d_head`` column block is ``dL/dT`` of the group's
``k``-th head. Autograd runs on the model's own parameters with ``requires_grad`` switched on for
``W_Q`` (or ``W_V``) only; all flags are restored afterwards and no weight is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..decomposition.pca import HeadPCA
from ..decomposition.plans import Plan, drop_one_plans
from ..model.heads import head_labels, parse_heads
from ..representations import HeadSpaceRepresentation, Representation, get
from .perplexity import PerplexityResult, perplexity, validate_tokens
from .sweep import run_sweep

__all__ = [
    "IMPORTANCE_SCORES",
    "circuit_gradient",
    "component_importance",
    "head_importance",
    "head_importance_matrix",
    "importance_order",
    "k_reaching",
    "rank_correlation",
]

Method = Literal["drop_one", "gradient"]
#: Default ranking score of each method's result (largest = most important).
IMPORTANCE_SCORES = {"drop_one": "delta_nll", "gradient": "fisher"}


# ------------------------------------------------------------------ gradients
def _loss_per_chunk(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each chunk ``[b]``, differentiable, in at least float32 (float64 models stay float64)."""
    logits = model(batch, return_type="logits")
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, batch[:, 1:, None]).squeeze(-1).mean(dim=1)


def _head_space(representation: str | Representation, purpose: str) -> HeadSpaceRepresentation:
    rep = get(representation)
    if not isinstance(rep, HeadSpaceRepresentation) or not rep.supported("importance"):
        raise ValueError(
            f"{purpose} works on head-space representations that support importance ('qk', 'ov'), "
            f"not {rep.name!r}"
        )
    return rep


def _iter_chunk_gradients(
    model: Any, tokens: torch.Tensor, representation: HeadSpaceRepresentation, progress: bool
) -> Iterator[torch.Tensor]:
    """Yield, for every chunk, ``dL_chunk/dT`` ``[n_layers, n_heads, d_head, d_head]`` float64 (CPU)."""
    validate_tokens(model, tokens)
    cfg = model.cfg
    circuit = representation.circuit
    slots = representation.written_slots(model)
    params = [slot.parameter for slot in slots]
    chain = representation.gradient_factors(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    device = model.W_U.device
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        for i in tqdm(range(len(tokens)), desc=f"gradients ({circuit})", disable=not progress, leave=False):
            batch = tokens[i : i + 1].long().to(device)
            with torch.enable_grad():
                loss = _loss_per_chunk(model, batch).sum()
                grads = [slot.of(g) for slot, g in zip(slots, torch.autograd.grad(loss, params), strict=True)]
            out = torch.empty(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, dtype=torch.float64)
            for layer, (g, GinvUt) in enumerate(zip(grads, chain, strict=False)):
                dR_t = GinvUt @ g.to(torch.float64)  # (dL/dR_g)^T: [n_groups, r*d_head, d_head]
                dR = dR_t.transpose(-1, -2)  # [n_groups, d_head, r*d_head]
                n_g = dR.shape[0]
                # column block k of group g is head g*r + k
                per_head = dR.reshape(n_g, cfg.d_head, -1, cfg.d_head).permute(0, 2, 1, 3)
                out[layer] = per_head.reshape(cfg.n_heads, cfg.d_head, cfg.d_head).cpu()
            yield out
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


def circuit_gradient(
    model: Any,
    tokens: torch.Tensor,
    representation: str | Representation = "qk",
    progress: bool = True,
) -> torch.Tensor:
    """Gradient of the mean per-chunk NLL with respect to every head's circuit matrix.

    Args:
        model: the model (unchanged; ``requires_grad`` flags restored afterwards).
        tokens: ``[n_chunks, ctx]``; one forward and backward pass per chunk.
        representation: ``"qk"`` (``T = W_Q^T W_K``, through ``W_Q``) or ``"ov"`` (``T = W_V^T W_O^T``,
            through ``W_V``); see the module docstring for the chain rule.

    Returns:
        ``dL/dT`` ``[n_layers, n_heads, d_head, d_head]`` float64, where ``L`` is the mean over
        chunks of each chunk's mean NLL (nats), i.e. :func:`qk_subspace.perplexity`'s ``mean_nll``.
    """
    rep = _head_space(representation, "circuit_gradient")
    total = None
    for g in _iter_chunk_gradients(model, tokens, rep, progress):
        total = g if total is None else total + g
    assert total is not None
    return total / len(tokens)


# ----------------------------------------------------------- component ranking
def _fitted_head_space(
    model: Any, pca: HeadPCA, representation: str | Representation | None
) -> HeadSpaceRepresentation:
    """The (head-space) representation of ``pca``, checked against the model."""
    if not hasattr(pca, "components_"):
        raise RuntimeError(
            "pca is not fitted: fit it on the heads of a head-space representation (qk, ov) first"
        )
    own = getattr(pca.heads_, "representation", None)
    rep = _head_space(representation or own or "qk", "importance")
    if own is not None and own != rep.name:
        raise ValueError(f"the PCA was fitted on {own!r} heads, not {rep.name!r}")
    cfg = model.cfg
    if pca.head_shape_ != (cfg.n_layers, cfg.n_heads) or pca.matrix_shape_ != (cfg.d_head, cfg.d_head):
        raise ValueError(
            f"pca was fitted on heads {pca.head_shape_} of matrices {pca.matrix_shape_}; this model has "
            f"({cfg.n_layers}, {cfg.n_heads}) heads of ({cfg.d_head}, {cfg.d_head})"
        )
    return rep


def _resolve_components(pca: HeadPCA, components: Sequence[int] | None) -> list[int]:
    if components is None:
        return list(range(pca.n_nonzero_components_))
    comps = [int(c) for c in components]
    bad = [c for c in comps if not 0 <= c < pca.n_components_]
    if bad:
        raise ValueError(f"components: indices must be in [0, {pca.n_components_ - 1}], got {bad}")
    if len(set(comps)) != len(comps):
        raise ValueError(f"components: indices must be distinct, got {comps}")
    return comps


def component_importance(
    model: Any,
    pca: HeadPCA,
    tokens: torch.Tensor,
    method: Method = "drop_one",
    components: Sequence[int] | None = None,
    *,
    representation: str | Representation | None = None,
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Functional importance of principal components of the heads' circuit matrices.

    Args:
        model: the model ``pca`` was fitted on.
        pca: a fitted :class:`~qk_subspace.decomposition.pca.HeadPCA` of head-space matrices
            ``[n_layers, n_heads, d_head, d_head]`` (``"qk"`` or ``"ov"`` heads; for plain matrices
            ``representation`` says which, default ``"qk"``).
        tokens: ``[n_chunks, ctx]``. Drop-one runs one perplexity evaluation per component, so a
            smaller token budget than the main sweep is usually enough.
        method: ``"drop_one"`` (measured) or ``"gradient"`` (first-order Taylor and empirical
            Fisher from one backward pass per chunk); see the module docstring.
        components: component indices to score (default: every component with non-zero variance).
        baseline: the unedited model's perplexity on ``tokens`` (drop-one; computed if omitted).
        batch_size, progress, n_boot, seed: as for :func:`qk_subspace.sweep_k`.

    Returns:
        DataFrame, one row per component, with ``component``, ``explained_variance_ratio`` and

        * drop-one: ``ppl``, ``mean_nll``, ``delta_nll`` (nats/token, edited minus baseline),
          ``ratio`` (perplexity ratio) with ``ratio_low``/``ratio_high`` (paired bootstrap CI over
          chunks), ``max_residual`` (injection);
        * gradient: ``taylor`` (first-order estimate of ``delta_nll``), ``taylor_abs``, ``fisher``
          (``(1/2) mean_chunks (<dL_b/dT, Delta_j>)^2``), ``taylor_fisher`` (``taylor + fisher``,
          the second-order estimate with the Fisher as curvature), and ``taylor_std`` (the
          per-chunk standard deviation of the first-order term).

        ``df.attrs``: ``method``, ``circuit``, ``score`` (the default ranking column),
        ``n_tokens``, ``baseline_ppl`` (drop-one), ``grad_norm`` (gradient).
    """
    rep = _fitted_head_space(model, pca, representation)
    validate_tokens(model, tokens)
    comps = _resolve_components(pca, components)
    attrs: dict[str, Any] = {
        "method": method,
        "circuit": rep.circuit,
        "score": None,
        "n_tokens": int(tokens.shape[0] * (tokens.shape[1] - 1)),
    }
    if method == "drop_one":
        if baseline is None:
            baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
        rows = _drop_one_rows(model, tokens, rep, pca, comps, baseline, batch_size, progress, n_boot, seed)
        attrs["baseline_ppl"] = baseline.ppl
    elif method == "gradient":
        rows, attrs["grad_norm"] = _gradient_rows(model, tokens, rep, pca, comps, progress)
    else:
        raise ValueError(f"method must be 'drop_one' or 'gradient', got {method!r}")
    attrs["score"] = IMPORTANCE_SCORES[method]
    df = pd.DataFrame(rows)
    df.attrs.update(attrs)
    return df


def _drop_one_rows(
    model: Any,
    tokens: torch.Tensor,
    rep: Representation,
    pca: HeadPCA,
    comps: list[int],
    baseline: PerplexityResult,
    batch_size: int,
    progress: bool,
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Drop-one rows: every head rebuilt without component ``j``, evaluated by the sweep engine."""
    df = run_sweep(
        model, tokens, rep, pca.heads_, drop_one_plans(pca, comps), baseline=baseline, batch_size=batch_size,
        progress=progress, n_boot=n_boot, seed=seed, desc=f"drop-one ({rep.circuit})",
    )  # fmt: skip
    df.insert(df.columns.get_loc("ratio"), "delta_nll", df["mean_nll"] - baseline.mean_nll)
    return df.to_dict("records")


def _gradient_rows(
    model: Any,
    tokens: torch.Tensor,
    rep: HeadSpaceRepresentation,
    pca: HeadPCA,
    comps: list[int],
    progress: bool,
) -> tuple[list[dict[str, Any]], float]:
    """Gradient rows (first-order Taylor and empirical Fisher per component) and the gradient's norm."""
    evr = pca.explained_variance_ratio_
    V = torch.from_numpy(pca.components_[comps])  # [m, d*d]
    C = torch.from_numpy(pca.coefficients_[:, comps])  # [n_heads_total, m]
    s = []  # per chunk: <dL_b/dT, Delta_j> for every j, Delta_hj = -c_hj V_j
    total = None
    for g in _iter_chunk_gradients(model, tokens, rep, progress):
        flat = g.reshape(-1, V.shape[1])  # [n_heads_total, d*d]
        s.append(-(C * (flat @ V.T)).sum(dim=0))
        total = g if total is None else total + g
    S = torch.stack(s).numpy()  # [n_chunks, m]
    taylor, fisher = S.mean(axis=0), 0.5 * (S**2).mean(axis=0)
    std = S.std(axis=0, ddof=1) if len(S) > 1 else np.zeros(len(comps))
    rows = [
        {
            "component": j,
            "explained_variance_ratio": float(evr[j]),
            "taylor": float(taylor[i]),
            "taylor_abs": float(abs(taylor[i])),
            "fisher": float(fisher[i]),
            "taylor_fisher": float(taylor[i] + fisher[i]),
            "taylor_std": float(std[i]),
        }
        for i, j in enumerate(comps)
    ]
    assert total is not None
    return rows, float(torch.linalg.vector_norm(total / len(tokens)))


def importance_order(result: pd.DataFrame | Sequence[int], score: str | None = None) -> list[int]:
    """Component indices, most important first.

    Args:
        result: a :func:`component_importance` DataFrame (sorted by ``score`` descending, ties
            by component index), or an explicit ordering (returned as a list of ints).
        score: the column to rank by (default ``result.attrs["score"]``).
    """
    if not isinstance(result, pd.DataFrame):
        return [int(c) for c in result]
    col = score or result.attrs.get("score")
    if col is None or col not in result.columns:
        raise ValueError(
            f"score: pick a column of the importance result, one of {list(result.columns)}; got {col!r}"
        )
    ranked = result.sort_values([col, "component"], ascending=[False, True], kind="mergesort")
    return [int(c) for c in ranked["component"]]


def rank_correlation(
    a: pd.DataFrame, b: pd.DataFrame, score_a: str | None = None, score_b: str | None = None
) -> dict[str, float]:
    """Spearman rank correlation between two importance results over their common components.

    Returns ``{"spearman": rho, "p_value": p, "n": number of components}``.
    """
    from scipy.stats import spearmanr

    ca, cb = score_a or a.attrs.get("score"), score_b or b.attrs.get("score")
    merged = a[["component", ca]].merge(b[["component", cb]], on="component", suffixes=("_a", "_b"))
    if len(merged) < 3:
        raise ValueError(f"rank_correlation needs at least 3 common components, got {len(merged)}")
    xa = merged[ca if ca != cb else f"{ca}_a"]
    xb = merged[cb if ca != cb else f"{cb}_b"]
    rho, p = spearmanr(xa, xb)
    return {"spearman": float(rho), "p_value": float(p), "n": len(merged)}


# ---------------------------------------------------------------- head level
def head_importance(
    model: Any,
    pca: HeadPCA,
    tokens: torch.Tensor,
    K: int | None = None,
    components: Sequence[int] | None = None,
    *,
    mode: Literal["only", "all_but"] = "only",
    representation: str | Representation | None = None,
    heads: Any = None,
    baseline: PerplexityResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Which heads' reconstruction errors cost the most: per-head ablation of the compression.

    The compressed circuits are ``pca.reconstruct(K)`` (or ``components=``, e.g. an importance
    ordering's first K). ``mode="only"`` injects the compressed circuit into one head at a time
    (all others exact): the cost of that head's reconstruction error. ``mode="all_but"`` compresses
    every head except one: the recovery from keeping that head exact (compare ``ratio`` with
    ``df.attrs["ratio_all"]``, all heads compressed).

    Args:
        heads: heads to score (default all), as for :func:`qk_subspace.inject_qk`.

    Returns:
        DataFrame, one row per scored head: ``layer``, ``head``, ``label``, ``ppl``, ``mean_nll``,
        ``delta_nll``, ``ratio`` (to baseline) with its paired bootstrap CI ``ratio_low``/``ratio_high``,
        ``max_residual``, ``reconstruction_error`` (Frobenius norm of that head's error);
        ``df.attrs``: ``mode``, ``circuit``, ``K``, ``baseline_ppl`` and, for ``"all_but"``,
        ``ratio_all``.
    """
    rep = _fitted_head_space(model, pca, representation)
    if mode not in ("only", "all_but"):
        raise ValueError(f"mode must be 'only' or 'all_but', got {mode!r}")
    cfg = model.cfg
    mixing = pca.mixing(K=K, components=components)
    target = pca.heads_.materialize(mixing)
    err = torch.linalg.matrix_norm(rep.matrices(model).cpu() - target.cpu())  # [L, H]
    mask = parse_heads(heads, cfg.n_layers, cfg.n_heads)
    labels = head_labels(cfg.n_layers, cfg.n_heads)
    if baseline is None:
        baseline = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc="baseline")
    attrs: dict[str, Any] = {"mode": mode, "circuit": rep.circuit, "K": K, "baseline_ppl": baseline.ppl}
    common: dict[str, Any] = {"baseline": baseline, "batch_size": batch_size, "n_boot": n_boot, "seed": seed}
    if mode == "all_but":
        full = run_sweep(
            model, tokens, rep, pca.heads_, [Plan("all heads", mixing)], progress=False, **common
        )
        attrs["ratio_all"] = float(full["ratio"].iloc[0])
    plans = []
    for layer, head in [(int(l_), int(h)) for l_, h in torch.nonzero(mask).tolist()]:
        sel = np.zeros((cfg.n_layers, cfg.n_heads), dtype=bool)
        sel[layer, head] = True
        cols = {"layer": layer, "head": head, "label": labels[layer * cfg.n_heads + head]}
        tail = {"reconstruction_error": float(err[layer, head])}
        plans.append(
            Plan(cols["label"], mixing.restrict((sel if mode == "only" else ~sel).ravel()), cols, tail)
        )
    df = run_sweep(model, tokens, rep, pca.heads_, plans, progress=progress, desc=f"heads ({mode})", **common)
    if len(df):
        df.insert(df.columns.get_loc("ratio"), "delta_nll", df["mean_nll"] - baseline.mean_nll)
    df.attrs.update(attrs)
    return df


def head_importance_matrix(
    df: pd.DataFrame, column: str = "ratio", n_layers: int | None = None, n_heads: int | None = None
) -> np.ndarray:
    """A :func:`head_importance` column as a ``[n_layers, n_heads]`` array (NaN for heads not scored)."""
    L = n_layers if n_layers is not None else int(df["layer"].max()) + 1
    H = n_heads if n_heads is not None else int(df["head"].max()) + 1
    out = np.full((L, H), np.nan)
    out[df["layer"].to_numpy(), df["head"].to_numpy()] = df[column].to_numpy()
    return out


def k_reaching(sweep: pd.DataFrame, threshold: float = 1.1) -> dict[str, int | None]:
    """Where a :func:`qk_subspace.sweep_k` curve gets within ``threshold`` x of the baseline.

    Returns ``{"first": smallest K with ratio <= threshold, "stays": smallest K from which every
    larger K in the sweep also has ratio <= threshold}`` (``None`` when no K qualifies).
    """
    df = sweep.sort_values("K")
    ok = (df["ratio"] <= threshold).to_numpy()
    ks = df["K"].to_numpy()
    first = int(ks[ok][0]) if ok.any() else None
    stays = None
    for i in range(len(ks) - 1, -1, -1):
        if not ok[i]:
            break
        stays = int(ks[i])
    return {"first": first, "stays": stays}
