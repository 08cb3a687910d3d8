"""Gauge freedom of the QK circuit: random and canonical per-head bases, applied in place.

For one head the attention score between a query residual ``x`` and a key residual ``y`` is

    s(x, y) = (x W_Q + b_Q) (y W_K + b_K)^T             # W_Q, W_K: [d_model, d_head]

Replacing ``W_Q -> W_Q G``, ``b_Q -> b_Q G``, ``W_K -> W_K G^{-T}``, ``b_K -> b_K G^{-T}`` for any
invertible ``G`` ([d_head, d_head]) leaves ``s`` and therefore the whole model unchanged, but changes
the report's ``W_QK = W_Q^T W_K`` into ``G^T W_QK G^{-T}``. Only the ``d_model x d_model`` circuit
``C = W_Q W_K^T`` (and its bias terms) is basis-free.

Grouped-query attention: the query heads of one key/value group share ``W_K``, so they must share
one ``G``; this module draws one ``G`` per key/value head and applies it to every query head of
the group and to ``_W_K`` / ``_b_K``.

Rotary models: the rotary embedding multiplies q and k (row vectors) by a position-dependent
block rotation ``M_p`` between the projection and the dot product, so the score at positions
``(p, p')`` is ``q M_p M_{p'}^T k^T``. A gauge preserves the model only if ``G M_p = M_p G`` for
every ``p``. TransformerLens rotates the dimension pairs ``(i, i + rotary_dim/2)`` for
``i < rotary_dim/2`` (GPT-NeoX/Llama convention, ``cfg.rotary_adjacent_pairs=False``) or
``(2i, 2i+1)`` (GPT-J convention, ``rotary_adjacent_pairs=True``); dimensions from ``rotary_dim``
on are not rotated. With distinct non-zero frequencies the matrices commuting with all ``M_p`` are:
on every rotated pair a scaled 2x2 rotation ``s R(theta)``, no coupling between pairs or between
rotated and non-rotated dimensions, and any invertible block on the non-rotated dimensions. That
is the group :func:`random_gauge` draws from for rotary models. Note ``(s R)^{-T} = R / s``.

Canonical gauge (:func:`canonical_gauge`). Non-rotary models: for every key/value group the
bias-augmented factors ``Q = [W_Q; b_Q]`` (the group's query heads stacked) and ``K = [W_K; b_K]``
are replaced by the balanced SVD factorisation of ``Q K^T = U S V^T``: ``Q' = U S^{1/2}``,
``K' = V S^{1/2}`` (what TransformerLens' ``refactor_factored_attn_matrices`` does per head), with a
deterministic sign per column (the largest-magnitude entry of each query column is positive).
``Q' K'^T = Q K^T`` exactly, so the scores, including all bias terms, are unchanged. Caveats:
(1) ``W_Q'^T W_K'`` is then a function of the circuit only up to rotations inside groups of equal
singular values (degenerate spectra; rare in trained models, common in toy ones), (2) the bias is
part of the factorisation, so heads with large ``b_Q``/``b_K`` get a basis that reflects the biases
too, (3) for GQA the basis is shared by the group, so it canonicalises the group's joint circuit,
not each query head's. Rotary models: the SVD basis does not commute with the rotations and would
change the model at every non-zero relative position (TransformerLens refuses for the same
reason). :func:`canonical_gauge` therefore uses, by default (``rotary="commuting"``), the best
canonical form inside the commuting group: on every rotated pair the scale is chosen so that the
query and key pair have equal norms and the rotation diagonalises the pair's joint second moment
``Q_p^T Q_p + K_p^T K_p`` (a per-pair sign remains, fixed by the same sign rule); the non-rotated
block gets the balanced SVD form. It preserves the model exactly but is weaker than the SVD basis:
the rotated part of ``W_Q^T W_K`` is canonical only up to that construction, not diagonal.
``rotary="error"`` refuses instead, ``rotary="svd"`` applies the SVD basis anyway with a warning
(the model's outputs then change; only useful for looking at the position-0 circuit).

All writes go through :class:`qk_subspace.edits.parameter_edit.ParameterEdit`; leaving the ``with`` block
restores every parameter bit for bit.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from ..model import backends
from ..model.rotary import rotary_pairs
from ..model.weights import key_parameter_names, kv_groups, named_weights
from .parameter_edit import ParameterEdit

__all__ = [
    "GaugeEdit",
    "canonical_gauge",
    "check_gauge_support",
    "gauged",
    "gauge_plan",
    "random_gauge",
    "random_gauge_matrices",
    "rotary_pairs",
]


# ----------------------------------------------------------------------------- structure
def check_gauge_support(model: Any) -> None:
    """Raise ``ValueError`` if the model's attention has a feature that breaks the gauge symmetry."""
    cfg = model.cfg
    problems = []
    if getattr(cfg, "use_qk_norm", False):
        problems.append("use_qk_norm=True (a norm on q/k per head is not gauge-covariant)")
    elif backends.has_qk_norm(model):
        problems.append(f"{backends.architecture(model)} applies a norm to q and k")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("clip_qkv clamps q and k entrywise")
    if getattr(cfg, "load_in_4bit", False):
        problems.append("4-bit weights cannot be edited")
    if getattr(cfg, "use_attn_in", False) or getattr(cfg, "use_split_qkv_input", False):
        pass  # per-head inputs are fine: the gauge acts after the projection
    if problems:
        raise ValueError(f"gauge transforms are not supported for this model: {'; '.join(problems)}")


def _kv_heads(model: Any) -> int:
    return kv_groups(model)[0]


def _rotary_dim(model: Any) -> int:
    return 2 * len(rotary_pairs(model))


# ----------------------------------------------------------------------------- random gauges
def _well_conditioned(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """Random ``U diag(s) V^T`` ([n, n], float64) with log-uniform singular values, ``cond(G) <= cond``."""
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    half = 0.5 * torch.log(torch.tensor(float(cond), dtype=torch.float64))
    s = torch.exp((2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * half)
    return U @ torch.diag(s) @ V.T


def random_gauge_matrices(model: Any, seed: int = 0, cond: float = 10.0) -> torch.Tensor:
    """Draw one random well-conditioned gauge per layer and key/value head (pure, float64).

    Non-rotary models: ``G = U diag(s) V^T`` with Haar-random orthogonal ``U, V`` and singular
    values log-uniform in ``[cond^{-1/2}, cond^{1/2}]``. Rotary models: on every rotated pair
    ``s R(theta)`` (``theta`` uniform, ``s`` log-uniform as above), and a block of the first kind
    on the non-rotated dimensions; this commutes with every rotary rotation. ``cond(G) <= cond``.

    Returns:
        ``[n_layers, n_kv_heads, d_head, d_head]`` float64 on the CPU.
    """
    check_gauge_support(model)
    if not float(cond) >= 1.0:
        raise ValueError(f"cond must be >= 1 (the condition number of G), got {cond!r}")
    cfg = model.cfg
    gen = torch.Generator().manual_seed(int(seed))
    pairs = rotary_pairs(model)
    rd = 2 * len(pairs)
    half = 0.5 * torch.log(torch.tensor(float(cond), dtype=torch.float64))
    out = torch.zeros(cfg.n_layers, _kv_heads(model), cfg.d_head, cfg.d_head, dtype=torch.float64)
    for layer in range(cfg.n_layers):
        for g in range(_kv_heads(model)):
            if not pairs:
                out[layer, g] = _well_conditioned(cfg.d_head, cond, gen)
                continue
            G = torch.zeros(cfg.d_head, cfg.d_head, dtype=torch.float64)
            for a, b in pairs:
                theta = 2 * torch.pi * torch.rand((), generator=gen, dtype=torch.float64)
                s = torch.exp((2 * torch.rand((), generator=gen, dtype=torch.float64) - 1) * half)
                c, sn = torch.cos(theta), torch.sin(theta)
                G[a, a], G[a, b], G[b, a], G[b, b] = s * c, -s * sn, s * sn, s * c
            if rd < cfg.d_head:
                G[rd:, rd:] = _well_conditioned(cfg.d_head - rd, cond, gen)
            out[layer, g] = G
    return out


def gauge_plan(model: Any, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """New ``W_Q, b_Q, W_K, b_K`` (or ``_W_K, _b_K``) for per-group gauges ``G`` (pure, no writes).

    Args:
        G: ``[n_layers, n_kv_heads, d_head, d_head]``, invertible. Query head ``h`` uses
            ``G[l, h // (n_heads // n_kv_heads)]`` (TransformerLens' ``repeat_interleave``).

    Returns:
        ``{parameter name: new value}`` in the model's dtype, computed in float64.
    """
    cfg = model.cfg
    n_kv = _kv_heads(model)
    expected = (cfg.n_layers, n_kv, cfg.d_head, cfg.d_head)
    if tuple(G.shape) != expected:
        raise ValueError(
            f"G must have shape [n_layers, n_kv_heads, d_head, d_head] = {expected}, got {tuple(G.shape)}"
        )
    rep = cfg.n_heads // n_kv
    params = named_weights(model)
    plan: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            Gl = G[layer].to(torch.float64)
            Ginv_T = torch.linalg.inv(Gl).transpose(-1, -2)  # [n_kv, d_head, d_head]
            Gq = Gl.repeat_interleave(rep, dim=0)  # per query head
            pre = f"blocks.{layer}.attn."
            wq = params[pre + "W_Q"]
            plan[pre + "W_Q"] = (wq.detach().double() @ Gq.to(wq.device)).to(wq.dtype)
            if pre + "b_Q" in params:
                bq = params[pre + "b_Q"]
                plan[pre + "b_Q"] = (bq.detach().double()[:, None, :] @ Gq.to(bq.device))[:, 0].to(bq.dtype)
            wk_name, bk_name = key_parameter_names(model, layer)
            wk = params[wk_name]
            plan[wk_name] = (wk.detach().double() @ Ginv_T.to(wk.device)).to(wk.dtype)
            if bk_name in params:
                bk = params[bk_name]
                plan[bk_name] = (bk.detach().double()[:, None, :] @ Ginv_T.to(bk.device))[:, 0].to(bk.dtype)
    return plan


class GaugeEdit(ParameterEdit):
    """An active gauge transform (returned by :func:`random_gauge` / :func:`canonical_gauge`).

    Attributes:
        kind: ``"random"`` or ``"canonical"``.
        G: ``[n_layers, n_kv_heads, d_head, d_head]`` float64, the gauges applied (random gauges;
            for canonical gauges set on entry when every factor has full column rank, else ``None``).
        seed, cond: the random gauge's parameters (``None`` for canonical).
    """

    def __init__(
        self,
        model: Any,
        plan_fn: Callable[[GaugeEdit], dict[str, torch.Tensor]],
        kind: str,
        name: str,
    ) -> None:
        # the plan is computed on entry, from this edit's attributes (G, ...)
        super().__init__(model, lambda: plan_fn(self), name=name)
        self.kind = kind
        self.G: torch.Tensor | None = None
        self.seed: int | None = None
        self.cond: float | None = None
        self.singular_values: torch.Tensor | None = None


def random_gauge(model: Any, seed: int = 0, cond: float = 10.0) -> GaugeEdit:
    """Apply a random per-head gauge in place; use as a context manager (restores bit for bit).

    Every score, and so the model's output, is unchanged up to float round-off (about
    ``cond * eps`` relative); ``W_Q^T W_K`` changes. See the module docstring for the group
    (rotary and grouped-query models). The gauges are drawn when the block is entered.

    Example::

        with qs.random_gauge(model, seed=1) as g:
            W = qs.qk_matrices(model)     # a different W_QK for the same model
            g.G                           # [n_layers, n_kv_heads, d_head, d_head]
    """
    check_gauge_support(model)
    edit = GaugeEdit(
        model,
        lambda e: gauge_plan(model, e.G),  # type: ignore[arg-type]
        kind="random",
        name=f"random_gauge(seed={seed}, cond={cond})",
    )
    edit.G = random_gauge_matrices(model, seed=seed, cond=cond)
    edit.seed, edit.cond = int(seed), float(cond)
    return edit


def gauged(model: Any, seed: int | None, cond: float = 10.0) -> contextlib.AbstractContextManager[Any]:
    """:func:`random_gauge` with ``seed``, or the model as it is for ``seed=None`` (gauge 0 of a study)."""
    return contextlib.nullcontext() if seed is None else random_gauge(model, seed=seed, cond=cond)


# ----------------------------------------------------------------------------- canonical gauge
def _sign_fix(Q: torch.Tensor) -> torch.Tensor:
    """Signs ``[d]`` making the largest-magnitude entry of every column of ``Q`` ([m, d]) positive."""
    idx = Q.abs().argmax(dim=0)
    s = torch.sign(Q[idx, torch.arange(Q.shape[1])])
    return torch.where(s == 0, torch.ones_like(s), s)


def _balanced_svd(Q: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced factorisation of ``Q K^T`` (``Q: [m, d], K: [n, d]``, float64) via thin QR + SVD.

    Returns ``Q' = U S^{1/2}``, ``K' = V S^{1/2}`` (``Q' K'^T = Q K^T``) and ``S``, with signs fixed.
    """
    Qq, Rq = torch.linalg.qr(Q)
    Qk, Rk = torch.linalg.qr(K)
    u, s, vh = torch.linalg.svd(Rq @ Rk.T)
    root = s.sqrt()
    Qn, Kn = Qq @ u * root, Qk @ vh.T * root
    sign = _sign_fix(Qn)
    return Qn * sign, Kn * sign, s


def _pair_canonical(Qp: torch.Tensor, Kp: torch.Tensor) -> torch.Tensor:
    """Scaled rotation ``s R`` ([2, 2]) putting one rotated pair into canonical form (see module doc)."""
    nq, nk = Qp.norm(), Kp.norm()
    if nq == 0 or nk == 0:
        return torch.eye(2, dtype=Qp.dtype)
    s = torch.sqrt(nk / nq)
    M = Qp.T @ Qp * s**2 + Kp.T @ Kp / s**2  # rotation-covariant joint second moment after scaling
    _, vecs = torch.linalg.eigh(M)
    R = vecs[:, [1, 0]]  # larger eigenvalue first
    if torch.det(R) < 0:
        R[:, 1] = -R[:, 1]
    # fix the remaining rotation by pi (-I): largest |entry| of the first query column positive
    if _sign_fix((Qp * s) @ R)[0] < 0:
        R = -R
    return s * R


def canonical_gauge(model: Any, rotary: Literal["commuting", "error", "svd"] = "commuting") -> GaugeEdit:
    """Put every head (key/value group) into a canonical basis in place; a context manager.

    Non-rotary models: balanced SVD factorisation of the bias-augmented circuit (as TransformerLens'
    ``refactor_factored_attn_matrices``), signs fixed. Rotary models: see ``rotary`` and the module
    docstring (what is and is not preserved).

    Args:
        rotary: for rotary models only: ``"commuting"`` (default; canonical form inside the group of
            gauges that commute with the rotations, preserves the model), ``"error"`` (refuse), or
            ``"svd"`` (the SVD basis anyway: warns, the model's outputs change).

    Attributes set on entry: ``singular_values`` ``[n_layers, n_kv_heads, d_head]`` (of the
    augmented circuit; non-rotary and ``"svd"`` only, else ``None``).
    """
    check_gauge_support(model)
    if rotary not in ("commuting", "error", "svd"):
        raise ValueError(f"rotary must be 'commuting', 'error' or 'svd', got {rotary!r}")
    pairs = rotary_pairs(model)
    if pairs and rotary == "error":
        raise ValueError(
            "canonical_gauge: this model uses rotary embeddings; the SVD-canonical basis does not commute "
            "with the rotations and would change the model. Use rotary='commuting' (model-preserving, "
            "weaker canonical form) or rotary='svd' (changes the model)"
        )
    if pairs and rotary == "svd":
        warnings.warn(
            "canonical_gauge(rotary='svd') on a rotary model: the SVD basis does not commute with the rotary "
            "rotations, so the model's outputs CHANGE inside this block "
            "(only the position-0 circuit is kept)",
            RuntimeWarning,
            stacklevel=2,
        )
    use_pairs = pairs if rotary == "commuting" else []
    return GaugeEdit(
        model,
        lambda e: _canonical_plan(model, e, use_pairs),
        kind="canonical",
        name=f"canonical_gauge(rotary={rotary!r})",
    )


def _canonical_plan(model: Any, edit: GaugeEdit, pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    n_kv = _kv_heads(model)
    rep = cfg.n_heads // n_kv
    d_head, d_model = cfg.d_head, cfg.d_model
    params = named_weights(model)
    plan: dict[str, torch.Tensor] = {}
    svals = torch.zeros(cfg.n_layers, n_kv, d_head, dtype=torch.float64)
    Gs = torch.zeros(cfg.n_layers, n_kv, d_head, d_head, dtype=torch.float64)
    rd = 2 * len(pairs)
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            pre = f"blocks.{layer}.attn."
            wk_name, bk_name = key_parameter_names(model, layer)
            Wq = params[pre + "W_Q"].detach().double().cpu()  # [n_heads, d_model, d_head]
            bq = (
                params[pre + "b_Q"].detach().double().cpu()
                if pre + "b_Q" in params
                else torch.zeros(cfg.n_heads, d_head, dtype=torch.float64)
            )
            Wk = params[wk_name].detach().double().cpu()  # [n_kv, d_model, d_head]
            bk = (
                params[bk_name].detach().double().cpu()
                if bk_name in params
                else torch.zeros(n_kv, d_head, dtype=torch.float64)
            )
            new_q, new_bq = Wq.clone(), bq.clone()
            new_k, new_bk = Wk.clone(), bk.clone()
            for g in range(n_kv):
                heads = list(range(g * rep, (g + 1) * rep))
                # bias-augmented factors; the group's query heads stacked: [rep * (d_model + 1), d_head]
                Q = torch.cat([torch.cat([Wq[h], bq[h][None]], dim=0) for h in heads], dim=0)
                K = torch.cat([Wk[g], bk[g][None]], dim=0)  # [d_model + 1, d_head]
                if not pairs:
                    Qn, Kn, s = _balanced_svd(Q, K)
                    svals[layer, g] = s
                else:
                    Qn, Kn = Q.clone(), K.clone()
                    G = torch.zeros(d_head, d_head, dtype=torch.float64)
                    for a, b in pairs:
                        G[[a, a, b, b], [a, b, a, b]] = _pair_canonical(Q[:, [a, b]], K[:, [a, b]]).flatten()
                    if rd < d_head:
                        Qr, Kr = Q[:, rd:], K[:, rd:]
                        Qn_r, Kn_r, _ = _balanced_svd(Qr, Kr)
                        # the block's G solves Qr G = Qn_r (exact when Qr has full column rank)
                        G[rd:, rd:] = torch.linalg.lstsq(Qr, Qn_r).solution
                    Qn = Q @ G
                    Kn = K @ torch.linalg.inv(G).T
                    if rd < d_head:
                        Qn[:, rd:], Kn[:, rd:] = Qn_r, Kn_r
                    Gs[layer, g] = G
                for i, h in enumerate(heads):
                    block = Qn[i * (d_model + 1) : (i + 1) * (d_model + 1)]
                    new_q[h], new_bq[h] = block[:d_model], block[d_model]
                new_k[g], new_bk[g] = Kn[:d_model], Kn[d_model]
            for name, value in (
                (pre + "W_Q", new_q),
                (pre + "b_Q", new_bq),
                (wk_name, new_k),
                (bk_name, new_bk),
            ):
                if name in params:
                    p = params[name]
                    plan[name] = value.to(device=p.device, dtype=p.dtype)
    edit.singular_values = None if pairs else svals
    edit.G = Gs if pairs else None
    return plan
