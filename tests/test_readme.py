"""The README is a manual that works: its Python blocks run as pasted, its numbers are current, it is short."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Words about how the work was organised (tracker numbers, sessions, machines lent) do not belong in the product.
ORGANISATION = re.compile(
    r"\b(sessions?|agents?|issue [0-9]+|#[0-9]+\b|lent to|this task|other jobs)\b", re.I
)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_python_blocks_run_as_pasted_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # they may write (results/...): not into the checkout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and need no network
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)


def test_readme_is_a_short_manual() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for needed in (
        "python3 -m venv",
        "pip install torch==2.13.0",
        "qk-subspace run\n",
        "```bash\npytest\n```",
    ):
        assert needed in text, needed


def test_the_ci_runs_the_readme_test_command() -> None:
    command = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README.read_text(), re.S)
    assert command is not None
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.group(1) in [line.strip() for line in ci]


def test_docs_speak_of_the_product_only() -> None:
    files = [README, ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "RESULTS.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    tracked = subprocess.run(["git", "ls-files", "qk_subspace", "tests", "demos", "benchmarks", "tools"],
                             cwd=ROOT, capture_output=True, text=True).stdout.split()  # fmt: skip
    files += [ROOT / f for f in tracked if f.endswith((".py", ".sh", ".md"))]
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        if p.is_file() and p.name != "test_readme.py"
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if ORGANISATION.search(line)
    ]
    assert hits == []


def test_result_numbers_in_readme_and_docs_are_current() -> None:
    assert load_tool("doc_numbers").main(["--check"]) == 0
