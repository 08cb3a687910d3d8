"""Plotly figures of a run, one module per figure family; every family is a function of the results JSON.

``experiment_figures(results)`` builds every figure a results document has sections for (a family
returns ``{}`` without its section), so figures can be rebuilt from ``exp6_<model>.json`` alone;
``save_figure`` writes HTML (and PNG where a Chromium is installed). To add a family: one module with a
``figures(results) -> {name: Figure}`` function, and its name in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._lazy import lazy_getattr
from .export import png_export_available, save_figure

__all__ = ["FAMILIES", "experiment_figures", "family", "png_export_available", "save_figure"]

#: Figure families in the order their figures are listed (modules of this package).
FAMILIES = (
    "variance", "sweep", "clustering", "diagnostics", "importance", "nulls", "layerwise", "gauge", "compare",
    "series",
)  # fmt: skip


def family(name: str) -> Any:
    """The module of a figure family (``qk_subspace.viz.<name>``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown figure family {name!r}; families are {list(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{name}")


def experiment_figures(results: dict, families: tuple[str, ...] = FAMILIES) -> dict[str, Any]:
    """Every figure of a results document, keyed by file name (``exp6a_cumvar_<model>``, ...)."""
    out: dict[str, Any] = {}
    for name in families:
        out.update(family(name).figures(results))
    return out


__getattr__ = lazy_getattr(__name__)
