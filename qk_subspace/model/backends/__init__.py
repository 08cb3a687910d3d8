"""Which TransformerLens model class holds a model: ``HookedTransformer`` or ``TransformerBridge``.

``load_model(..., backend="auto" | "hooked" | "bridge")`` chooses one; every other part of the
package asks :func:`of` for the module that knows the model's layout (:mod:`.hooked`, :mod:`.bridge`)
and gets the same results from both. ``"auto"`` is ``HookedTransformer`` where TransformerLens still
has it (3.x) and the bridge on TransformerLens 4, which deleted it; the environment variable
``QK_SUBSPACE_BACKEND=hooked|bridge`` changes what ``"auto"`` means (for a shell, a test run).
"""

from __future__ import annotations

import os
from importlib import metadata
from types import ModuleType
from typing import Any

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "architecture",
    "has_qk_norm",
    "name_of",
    "of",
    "resolve",
    "transformer_lens_version",
]

#: The values of ``backend=`` (``load_model``, ``--backend``).
BACKENDS = ("auto", "hooked", "bridge")
#: Environment variable: the backend ``"auto"`` stands for (default: hooked on 3.x, bridge on 4.x).
BACKEND_ENV = "QK_SUBSPACE_BACKEND"


def transformer_lens_version() -> str:
    """The installed transformer-lens version (``"0"`` when it is not installed)."""
    try:
        return metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        return "0"


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens still has ``HookedTransformer`` (3.x; 4.x deleted it)."""
    return int(transformer_lens_version().split(".")[0]) < 4


def resolve(backend: str) -> str:
    """``"hooked"`` or ``"bridge"`` for a ``backend=`` value (``"auto"`` resolved for this installation).

    Raises ValueError for an unknown value, or ``"hooked"`` on a TransformerLens without it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
        if chosen in ("", "auto"):
            return "hooked" if has_hooked_transformer() else "bridge"
        if chosen not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {list(BACKENDS)}, got {chosen!r}")
        return resolve(chosen)
    if backend == "hooked" and not has_hooked_transformer():
        raise ValueError(
            f"backend 'hooked' needs HookedTransformer, which transformer-lens {transformer_lens_version()} "
            "no longer has (4.x deleted it); use backend='bridge' or 'auto', or install transformer-lens<4"
        )
    return backend


def name_of(model: Any) -> str:
    """``"hooked"`` or ``"bridge"``: the TransformerLens class of ``model`` (TypeError for anything else)."""
    for cls in type(model).__mro__:
        if cls.__name__ == "HookedTransformer" and cls.__module__.startswith("transformer_lens"):
            return "hooked"
        if cls.__name__ == "TransformerBridge" and cls.__module__.startswith("transformer_lens"):
            return "bridge"
    raise TypeError(
        f"expected a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}"
    )


def architecture(model: Any) -> str | None:
    """The Hugging Face architecture of the model (``"GPT2LMHeadModel"``, ``"LlamaForCausalLM"``, ...)."""
    return of(model).architecture(model)


def has_qk_norm(model: Any) -> bool:
    """Whether the model normalises q and k per head (a norm that breaks the QK gauge symmetry)."""
    return bool(of(model).has_qk_norm(model))


def of(model_or_backend: Any) -> ModuleType:
    """The backend module (:mod:`.hooked` or :mod:`.bridge`) of a model, or of a resolved backend name."""
    name = model_or_backend if isinstance(model_or_backend, str) else name_of(model_or_backend)
    if name == "hooked":
        from . import hooked

        return hooked
    from . import bridge

    return bridge
