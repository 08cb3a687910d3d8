"""The recorded stories260K runs (one per flag family) are reproduced number for number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_tool, requires_shared

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"


TOOL = load_tool("golden_runs")


def test_compare_can_fail() -> None:
    old = {"metadata": {"package_versions": {"torch": "1"}}, "rows": [{"K": 1, "ratio": 2.0, "ppl": 3.0}]}
    same = {
        "metadata": {"package_versions": {"torch": "2"}},
        "rows": [{"K": 1, "ratio": 2.0, "ppl": 3.0, "new": 1}],
    }
    assert TOOL.compare(old, same) == []  # versions ignored, added keys allowed
    assert TOOL.compare(old, {**same, "rows": [{"K": 1, "ratio": 2.0000000000000004, "ppl": 3.0}]})
    assert TOOL.compare(old, {**same, "rows": [{"ratio": 2.0, "K": 1, "ppl": 3.0}]})  # column order
    assert TOOL.compare(old, {**same, "rows": []})
    assert TOOL.compare({"a": 1}, {"a": 1.0})  # an int that became a float
    # a bridge run: floats to float32 round-off, everything else exact
    meta = {"package_versions": {}, "backend": "bridge"}
    bridge = {**same, "metadata": meta, "rows": [{"K": 1, "ratio": 2.0001, "ppl": 3.0}]}
    assert TOOL.compare_run(old, bridge) == []
    assert TOOL.compare_run(old, {**bridge, "rows": [{"K": 1, "ratio": 2.01, "ppl": 3.0}]})
    assert TOOL.compare_run(old, {**bridge, "rows": [{"K": 2, "ratio": 2.0, "ppl": 3.0}]})


def _strings(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


@pytest.mark.parametrize("family", sorted(TOOL.FAMILIES))
def test_recorded_runs_name_no_machine_paths(family: str) -> None:
    recorded = json.loads((GOLDEN / family / "exp6_stories260K.json").read_text())
    paths = [s for s in _strings(recorded) if "shared/data" in s]
    assert paths and all(p.startswith("../shared/data/") for p in paths)


@requires_shared
@pytest.mark.parametrize("family", sorted(TOOL.FAMILIES))
def test_recorded_run_is_reproduced(family: str, tmp_path: Path) -> None:
    recorded = json.loads((GOLDEN / family / "exp6_stories260K.json").read_text())
    new = json.loads(TOOL.run_family(family, tmp_path).read_text())
    assert TOOL.compare_run(recorded, new) == []
