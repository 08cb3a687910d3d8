"""Record or check the results JSON of one CLI run per flag family on stories260K.

    python tools/golden_runs.py record DIR     # run every family, write DIR/<family>/exp6_stories260K.json
    python tools/golden_runs.py check DIR      # run again into a temp dir and compare number for number

The comparison ignores ``timings`` and ``metadata.package_versions`` (they describe the run, not its
results), writes the shared data folder as ``../shared/data`` wherever a path names it (the recorded files
do not depend on where the checkout is) and needs every other key and value of the recorded file to be present and equal, and the
columns of every table row in the same order (keys added by newer code are allowed).
The runs are recorded on ``HookedTransformer``; on a ``TransformerBridge`` (``--backend bridge``, or
TransformerLens 4) ``check`` compares floats to float32 round-off (:data:`BRIDGE_TOLERANCE`: the two
forwards sum in different orders) and every count, choice (K, clusters, heads) and string exactly,
except the two names the backends spell differently (:data:`BRIDGE_IGNORED`).
Needs ``../shared`` beside the repository.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "tinystories" / "tinystories_val.txt"
COMMON = ["--n-tokens", "4096", "--ctx", "256", "--no-png", "--no-progress", "--cluster-ks", "4", "8", "16"]
FAMILIES: dict[str, list[str]] = {
    "plain": [],
    "diagnostics": ["--diagnostics", "--diag-seqs", "4", "--diag-ctx", "64"],
    "importance": ["--order", "importance", "--importance-tokens", "2048"],
    "ov": ["--circuit", "ov"],
    "circuit_baselines": ["--space", "circuit", "--baselines", "--baseline-seeds", "2"],
    "groupby_layer": ["--groupby", "layer"],
    "gauges": ["--gauges", "1", "--ks", "3", "10", "40"],
}
IGNORED = (("timings",), ("metadata", "package_versions"))
#: ``(rtol, atol)`` of float comparisons of a bridge run with the recorded HookedTransformer runs.
BRIDGE_TOLERANCE = (3e-4, 1e-6)
#: Fields a bridge names differently: the backend itself; its model name is the checkpoint path; a folded
#: RMSNorm is "RMSPre" on HookedTransformer and stays "RMS" (with unit weights) on the bridge.
BRIDGE_IGNORED = (
    ("metadata", "backend"),
    ("metadata", "model_config", "model_name"),
    ("metadata", "model_config", "normalization_type"),
)


def run_family(family: str, out: Path) -> Path:
    """Run one family into ``out`` and return its results JSON, with the shared data paths portable."""
    from qk_subspace.cli import main

    args = ["run", "--model", str(MODEL), "--text-file", str(TEXT), "--out", str(out), *COMMON]
    rc = main(args + FAMILIES[family])
    if rc != 0:
        raise SystemExit(f"{family}: qk-subspace exited {rc}")
    path = out / "exp6_stories260K.json"
    path.write_text(path.read_text().replace(json.dumps(str(SHARED))[1:-1], "../shared/data"))
    return path


def in_rows(path: tuple[str, ...]) -> bool:
    """Whether ``path`` is a row of a table (a dict inside a list): their column order is kept too."""
    return bool(path) and path[-1].isdigit()


def compare(
    old: Any,
    new: Any,
    path: tuple[str, ...] = (),
    tolerance: tuple[float, float] = (0.0, 0.0),
    ignored: tuple[tuple[str, ...], ...] = IGNORED,
) -> list[str]:
    """Differences of ``new`` from ``old``: every key of ``old`` must be in ``new`` with an equal value
    (floats within ``tolerance = (rtol, atol)``; exactly equal by default)."""
    if path in ignored:
        return []
    where = ".".join(path) or "<root>"
    if isinstance(old, dict):
        if not isinstance(new, dict):
            return [f"{where}: was a dict, now {type(new).__name__}"]
        out: list[str] = []
        order = [k for k in new if k in old]
        if isinstance(new, dict) and in_rows(path) and order != [k for k in old if k in new]:
            out.append(f"{where}: key order {list(old)} became {order}")
        for k, v in old.items():
            if k not in new:
                out.append(f"{where}.{k}: missing")
            else:
                out += compare(v, new[k], (*path, k), tolerance, ignored)
        return out
    if isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            return [
                f"{where}: list of {len(old)} became {type(new).__name__} of {len(new) if isinstance(new, list) else '-'}"
            ]
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += compare(a, b, (*path, str(i)), tolerance, ignored)
        return out
    if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
        return []
    rtol, atol = tolerance
    if isinstance(old, float) and isinstance(new, float) and abs(old - new) <= atol + rtol * abs(old):
        return []
    if old != new or type(old) is not type(new):
        return [f"{where}: {old!r} -> {new!r}"]
    return []


def compare_run(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """:func:`compare` with the tolerance of the backend ``new`` ran on (``metadata.backend``)."""
    if new.get("metadata", {}).get("backend") == "bridge":
        return compare(recorded, new, tolerance=BRIDGE_TOLERANCE, ignored=IGNORED + BRIDGE_IGNORED)
    return compare(recorded, new)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    mode, base = argv[0], Path(argv[1])
    families = argv[2:] or list(FAMILIES)
    failed = 0
    for fam in families:
        if mode == "record":
            path = run_family(fam, base / fam)
            print(f"recorded {fam}: {path}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            new = json.loads(run_family(fam, Path(tmp)).read_text())
        old = json.loads((base / fam / "exp6_stories260K.json").read_text())
        diffs = compare_run(old, new)
        failed += bool(diffs)
        print(f"{fam}: {'identical' if not diffs else f'{len(diffs)} differences'}")
        for d in diffs[:20]:
            print("   ", d)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
