"""Representations of the heads' circuits, by name.

========================  =====================================================================
``"qk"``                  ``W_Q^T W_K`` per head (the report's method), exact through ``W_Q``
``"qk-canonical"``        the same in a canonical per-head basis (inside ``canonical_gauge``)
``"qk-circuit"``          ``W_Q W_K^T`` per head (gauge-invariant; per rotary pair), jointly through ``W_Q, W_K``
``"ov"``                  ``W_V^T W_O^T`` per head, exact through ``W_V``
========================  =====================================================================

``get(name)`` returns the registered :class:`~qk_subspace.representations.base.Representation`;
``register(rep)`` adds one (a new representation is one module plus one ``register`` call).
"""

from __future__ import annotations

from .base import OPTIONS, HeadSpaceRepresentation, Representation
from .circuit import CircuitHeads, CircuitRepresentation, circuit_gram, materialize_circuits
from .heads import DenseHeads, Heads, as_heads
from .mixing import DenseMixing, FeatureProjection, Mixing, Replacement, Restricted
from .ov import OVRepresentation
from .qk import CanonicalQKRepresentation, QKRepresentation

__all__ = [
    "OPTIONS",
    "REGISTRY",
    "CircuitHeads",
    "DenseHeads",
    "DenseMixing",
    "FeatureProjection",
    "HeadSpaceRepresentation",
    "Heads",
    "Mixing",
    "Replacement",
    "Representation",
    "Restricted",
    "as_heads",
    "circuit_gram",
    "for_circuit_and_space",
    "get",
    "materialize_circuits",
    "names",
    "register",
]

#: name -> representation instance.
REGISTRY: dict[str, Representation] = {}


def register(representation: Representation) -> Representation:
    """Add a representation to the registry under its ``name`` (replacing one of the same name)."""
    if not isinstance(representation, Representation):
        raise TypeError(f"register expects a Representation instance, got {type(representation).__name__}")
    REGISTRY[representation.name] = representation
    return representation


def names() -> list[str]:
    """The registered names."""
    return list(REGISTRY)


def get(name: str | Representation) -> Representation:
    """The representation registered as ``name`` (a representation instance is returned as is)."""
    if isinstance(name, Representation):
        return name
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown representation {name!r}; registered: {names()}") from None


def for_circuit_and_space(circuit: str, space: str) -> Representation:
    """The representation of ``circuit`` (``"qk"``/``"ov"``) in ``space`` (``"raw"``/``"canonical"``/``"circuit"``)."""
    for rep in REGISTRY.values():
        if rep.circuit == circuit and rep.space == space:
            return rep
    raise ValueError(
        f"no representation of the {circuit!r} circuit in the {space!r} space; registered: {names()}"
    )


for _rep in (QKRepresentation(), CanonicalQKRepresentation(), CircuitRepresentation(), OVRepresentation()):
    register(_rep)
