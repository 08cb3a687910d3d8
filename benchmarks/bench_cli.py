"""The front door, timed: ``qk-subspace run --help`` against ``python -c "import torch"``, and the wall time
of the default ``qk-subspace run`` (the embedded model, no network) in a fresh folder.

    python benchmarks/bench_cli.py              # prints a table and appends it to benchmarks/RESULTS.md
    python benchmarks/bench_cli.py --no-append

Help and import are timed interleaved (``--reps`` pairs, medians), each in a fresh process.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import common

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _wall(cmd: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved help/import pairs (default 5)")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    cli = shutil.which("qk-subspace") or "qk-subspace"
    helps, imports = [], []
    for _ in range(args.reps):
        helps.append(_wall([cli, "run", "--help"]))
        imports.append(_wall([sys.executable, "-c", "import torch"]))
    runs = {}
    for label, extra in (("no PNG", ["--no-png"]), ("with PNG" if common_png() else "PNG unavailable", [])):
        with tempfile.TemporaryDirectory() as tmp:
            runs[label] = _wall([cli, "run", "--no-progress", *extra], cwd=Path(tmp))
    h, i = statistics.median(helps), statistics.median(imports)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {now} -- `python benchmarks/bench_cli.py --reps {args.reps}`",
        "",
        f"{common.machine_info()}; {common.versions()}",
        "",
        "| measure | seconds |",
        "|---|---|",
        f"| `qk-subspace run --help`, median of {args.reps} [min, max] | {h:.3f} [{min(helps):.3f}, {max(helps):.3f}] |",
        f'| `python -c "import torch"`, median of {args.reps} [min, max] | {i:.3f} [{min(imports):.3f}, {max(imports):.3f}] |',
        f"| help / import torch | {h / i:.2f}x |",
        *(f"| `qk-subspace run` (defaults, {label}), wall | {t:.1f} |" for label, t in runs.items()),
    ]
    common.publish(
        lines,
        args.no_append,
        "## The command line: help and the default run",
        "Appended by `benchmarks/bench_cli.py`, newest last.",
    )


def common_png() -> bool:
    from qk_subspace.viz.export import png_export_available

    return png_export_available()


if __name__ == "__main__":
    main()
