"""demos/induction_heads.py on the real induction-2l model: what it measures, prints and writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
INDUCTION = SHARED_DATA / "models" / "induction-2l"
pytestmark = pytest.mark.skipif(not INDUCTION.is_dir(), reason="needs ../shared/data/models/induction-2l")


def _demo():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("induction_heads", ROOT / "demos" / "induction_heads.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_induction_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = _demo()
    assert demo.main([str(INDUCTION), "--out", str(tmp_path), "--no-png"]) == 0
    out = capsys.readouterr().out
    assert "strongest induction head" in out and "raw breaks it" in out
    assert (tmp_path / "induction_sweep.csv").is_file() and (tmp_path / "induction_heads.html").is_file()
    import pandas as pd

    df = pd.read_csv(tmp_path / "induction_sweep.csv")
    n = 8
    for space in ("raw", "invariant"):
        full = df[(df["space"] == space) & (df["K"] == n)].iloc[0]
        assert abs(full["loss_repeats"] - 2.33) < 0.05  # K = all is the model (README: repeats ~2.3 nats)
    # the model's repeats are far below the first block; the mean head (K=0) loses induction in both spaces
    raw0 = df[(df["space"] == "raw") & (df["K"] == 0)].iloc[0]
    assert raw0["loss_repeats"] > 5
