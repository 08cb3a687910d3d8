"""The model: loading, attention-weight layout, head indexing, head-space circuits, the fast path."""

from .._lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__)
