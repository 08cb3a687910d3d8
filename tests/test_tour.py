"""Execute the notebook tour end to end, from a scratch folder, on the embedded stories260K model."""

from __future__ import annotations

from pathlib import Path

import pytest

from qk_subspace.viz import png_export_available

ROOT = Path(__file__).resolve().parents[1]


def test_tour_notebook_committed_without_outputs() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(ROOT / "demos" / "tour.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_tour_notebook_runs_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("QK_SUBSPACE_TOUR_OUT", str(tmp_path / "tour_out"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(
        "QK_SUBSPACE_INDUCTION", str(ROOT.parent / "shared" / "data" / "models" / "induction-2l")
    )
    nb = nbformat.read(ROOT / "demos" / "tour.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "(invariant)" in text and "K=all" in text
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 4, "figures must render inline"
    if png_export_available():  # a static copy for viewers that run no JavaScript
        assert all("image/png" in o["data"] for o in figures)
    assert (tmp_path / "tour_out").exists()
