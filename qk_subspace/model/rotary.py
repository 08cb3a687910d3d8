"""The rotary structure of a head's QK circuit: which dimensions rotate together, and the circuit
split into the parts the rotations leave fixed.

Without rotary embeddings a head's attention score is the bilinear form ``x W_Q W_K^T y^T`` (biases
aside): one real circuit ``C = W_Q W_K^T`` ``[d_model, d_model]``, fixed by every gauge
``W_Q -> W_Q G, W_K -> W_K G^{-T}``.

With rotary embeddings the query and key are rotated by the angle of their positions on every rotated
pair of head dimensions ``(i, j)`` (:func:`rotary_pairs`). Write the pair's columns as one complex column,
``w = W[:, i] + 1j * W[:, j]`` ``[d_model]``; then ``q_i + 1j q_j = x w_Q`` and the rotation by the
position angle is a multiplication by ``exp(1j p theta)``, so at relative offset ``p`` the score is

    s_p(x, y) = sum_pairs Re(exp(1j p theta_pair) x Z_pair y^T) + x C_rest y^T,
    Z_pair = w_Q w_K^H  (complex, rank 1, [d_model, d_model]),  C_rest = W_Q[:, rest] W_K[:, rest]^T

where ``rest`` are the dimensions that are not rotated (``rotary_dim < d_head``). The gauges that
preserve a rotary model (scaled rotations on each pair, anything invertible on ``rest``; see
:mod:`qk_subspace.edits.gauge`) multiply ``w_Q`` by a complex number ``c`` and ``w_K`` by ``1 / conj(c)``,
which leaves every ``Z_pair`` fixed; conversely the parts determine ``s_p`` at every offset. So the parts
``(Z_pair..., C_rest)`` are the gauge-invariant circuit of a rotary head, and the single ``W_Q W_K^T``
(the offset-0 circuit, the real part of their sum) is not enough: it is fixed by gauges that change the
model.

:func:`circuit_parts` splits factors ``[..., d_model, d_head]`` into those parts' factors;
:func:`join_parts` puts (edited) parts back into ``W_Q`` / ``W_K`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CircuitLayout", "circuit_layout", "circuit_parts", "join_parts", "rotary_pairs"]


def rotary_pairs(model: Any) -> list[tuple[int, int]]:
    """The pairs of head dimensions rotated together by the rotary embedding ([] if not rotary).

    TransformerLens' ``rotate_every_two``: with ``cfg.rotary_adjacent_pairs`` the pairs are
    ``(2i, 2i+1)``, otherwise ``(i, i + rotary_dim // 2)``, for ``i < rotary_dim // 2``.
    """
    cfg = model.cfg
    if cfg.positional_embedding_type != "rotary":
        return []
    rd = int(cfg.rotary_dim or cfg.d_head)
    if getattr(cfg, "rotary_adjacent_pairs", False):
        return [(2 * i, 2 * i + 1) for i in range(rd // 2)]
    return [(i, i + rd // 2) for i in range(rd // 2)]


@dataclass(frozen=True)
class CircuitLayout:
    """How a head's ``d_head`` dimensions form the parts of its invariant circuit.

    Attributes:
        d_head: head dimension.
        pairs: rotated pairs ``(i, j)`` (one complex rank-1 part each); empty without rotary.
        rest: the dimensions not rotated (one real part of rank ``len(rest)``, absent if empty).
    """

    d_head: int
    pairs: tuple[tuple[int, int], ...] = ()
    rest: tuple[int, ...] = ()

    @classmethod
    def plain(cls, d_head: int) -> CircuitLayout:
        """No rotary: one real part, ``W_Q W_K^T`` over all ``d_head`` dimensions."""
        return cls(d_head, (), tuple(range(d_head)))

    @property
    def rotary(self) -> bool:
        return bool(self.pairs)

    @property
    def n_parts(self) -> int:
        return len(self.pairs) + (1 if self.rest else 0)

    @property
    def feature_dim_per_model_dim_sq(self) -> int:
        """Real numbers per head in units of ``d_model**2`` (2 per complex pair, 1 for the rest)."""
        return 2 * len(self.pairs) + (1 if self.rest else 0)

    def describe(self) -> str:
        if not self.pairs:
            return "W_Q W_K^T"
        rest = f" + the {len(self.rest)}-dim unrotated block" if self.rest else ""
        return f"{len(self.pairs)} rotary pair circuits w_Q w_K^H{rest}"


def circuit_layout(model: Any) -> CircuitLayout:
    """The model's :class:`CircuitLayout` (plain ``W_Q W_K^T`` without rotary)."""
    d_head = int(model.cfg.d_head)
    pairs = tuple(rotary_pairs(model))
    if not pairs:
        return CircuitLayout.plain(d_head)
    used = {d for p in pairs for d in p}
    return CircuitLayout(d_head, pairs, tuple(d for d in range(d_head) if d not in used))


def circuit_parts(W: torch.Tensor, layout: CircuitLayout) -> list[torch.Tensor]:
    """The factors of every part: ``W`` ``[..., d_model, d_head]`` -> ``[..., d_model, 1]`` complex per
    pair (``W[..., i] + 1j W[..., j]``), then ``[..., d_model, len(rest)]`` real for the rest (if any)."""
    out = []
    for i, j in layout.pairs:
        out.append(torch.complex(W[..., i], W[..., j]).unsqueeze(-1))
    if layout.rest:
        out.append(W[..., list(layout.rest)])
    return out


def join_parts(parts: list[torch.Tensor], layout: CircuitLayout) -> torch.Tensor:
    """Inverse of :func:`circuit_parts`: parts -> ``[..., d_model, d_head]`` real factors."""
    if len(parts) != layout.n_parts:
        raise ValueError(f"expected {layout.n_parts} parts, got {len(parts)}")
    ref = parts[0]
    dtype = ref.real.dtype if ref.is_complex() else ref.dtype
    W = torch.zeros(*ref.shape[:-1], layout.d_head, dtype=dtype)
    for (i, j), part in zip(layout.pairs, parts[: len(layout.pairs)], strict=True):
        W[..., i] = part[..., 0].real
        W[..., j] = part[..., 0].imag
    if layout.rest:
        W[..., list(layout.rest)] = parts[-1]
    return W
