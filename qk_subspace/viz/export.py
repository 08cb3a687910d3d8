"""Saving figures: HTML (plotly.js written once per folder, beside the figures) and, where a Chromium is
installed, PNG."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import plotly.graph_objects as go

__all__ = ["png_export_available", "save_figure"]


_PNG_WARNED = False


def png_export_available() -> bool:
    """Whether a Chromium/Chrome is installed for kaleido's PNG export."""
    if os.environ.get("QK_SUBSPACE_NO_PNG"):
        return False
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    return any(shutil.which(n) for n in names)


def save_figure(fig: go.Figure, out_dir: str | os.PathLike, name: str, png: bool = True) -> dict[str, str]:
    """Write ``fig`` as ``<out_dir>/<name>.html`` and, if possible, ``<name>.png``.

    The HTML loads ``plotly.min.js`` from its own folder (written there once, ~4.7 MB, instead of into
    every file), so keep the folder together. PNG export needs a Chromium (kaleido 1.x); without one,
    warns once and writes HTML only. Returns ``{"html": path, "png": path}`` for the files written.
    """
    global _PNG_WARNED
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"html": str(out / f"{name}.html")}
    fig.write_html(written["html"], include_plotlyjs="directory", full_html=True)
    if png:
        if png_export_available():
            try:
                fig.write_image(str(out / f"{name}.png"), scale=2)
                written["png"] = str(out / f"{name}.png")
            except Exception as exc:  # noqa: BLE001 - kaleido/Chromium failures must not lose the run
                if not _PNG_WARNED:
                    warnings.warn(f"PNG export failed ({exc}); wrote HTML only", RuntimeWarning, stacklevel=2)
                    _PNG_WARNED = True
        elif not _PNG_WARNED:
            warnings.warn(
                "PNG export needs Chromium (e.g. `apt-get install chromium`); writing HTML figures only",
                RuntimeWarning,
                stacklevel=2,
            )
            _PNG_WARNED = True
    return written
