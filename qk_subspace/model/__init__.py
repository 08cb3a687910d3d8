"""The model: loading, attention-weight layout, head indexing, head-space circuits, the fast path."""
