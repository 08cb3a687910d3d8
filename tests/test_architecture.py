"""The layout keeps its promises: no import cycles, short functions, a small and light namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


ARCH = load_tool("arch_metrics")


def test_no_import_cycles_between_package_modules() -> None:
    known = ARCH.modules()
    sweep = ARCH.imports("qk_subspace.evaluation.sweep", known["qk_subspace.evaluation.sweep"], known)
    assert {"qk_subspace.representations", "qk_subspace.evaluation.perplexity"} <= sweep  # edges are seen
    lazy = ARCH.imports("qk_subspace", known["qk_subspace"], known)
    assert "qk_subspace.experiment.runner" not in lazy  # TYPE_CHECKING imports do not count
    assert ARCH.cycles() == []


def test_functions_are_short_and_the_runner_only_composes() -> None:
    lengths = ARCH.function_lengths()
    assert [f for n, f in lengths if n > 150] == []
    assert next(n for n, f in lengths if f == "qk_subspace.experiment.runner:run_experiment") < 100


def test_small_namespace_and_few_type_ignores() -> None:
    assert ARCH.public_names() <= 40
    assert ARCH.type_ignores() <= 15


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return set(out.stdout.split())


def test_import_is_light() -> None:
    mods = _loaded_after("import qk_subspace")
    for heavy in ("torch", "plotly", "ray", "qk_subspace.experiment.runner", "transformer_lens"):
        assert heavy not in mods, heavy
    mods = _loaded_after("import qk_subspace as qs; qs.HeadPCA; qs.inject_qk")
    assert "torch" in mods and "plotly" not in mods and "qk_subspace.experiment.runner" not in mods


def test_cli_parser_needs_neither_torch_nor_plotly() -> None:
    mods = _loaded_after("from qk_subspace.cli import build_parser; build_parser()")
    assert "torch" not in mods and "plotly" not in mods
