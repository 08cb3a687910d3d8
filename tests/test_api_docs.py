"""The API reference cannot drift from ``qk_subspace.__all__``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import qk_subspace as qs

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "tools" / "gen_api.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_reference_is_current() -> None:
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == _generator().render(), "docs/api.md is stale: run `python tools/gen_api.py`"


def test_every_public_name_is_documented_and_exists() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    assert len(qs.__all__) == len(set(qs.__all__)), "duplicate names in __all__"
    for name in qs.__all__:
        assert hasattr(qs, name), name
        assert f"| `{name}` |" in text, name
    top = text.split("\n## `qk_subspace.")[0]
    documented = {line.split("`")[1] for line in top.splitlines() if line.startswith("| `")}
    assert documented == set(qs.__all__)
    assert len(qs.__all__) <= 40, "the top-level namespace stays small: put new names in a submodule"


def test_public_callables_have_docstrings() -> None:
    missing = [
        n for n in qs.__all__ if callable(getattr(qs, n)) and not (getattr(qs, n).__doc__ or "").strip()
    ]
    assert missing == []
