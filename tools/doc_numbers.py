"""Regenerate every result number quoted in README.md and docs/ (and the README's headline figure).

    python tools/doc_numbers.py            # run, then rewrite the marked blocks of README.md and docs/*.md
    python tools/doc_numbers.py --check    # run, and fail if a marked block differs from what the run gives

A marked block is the text between ``<!-- doc_numbers:NAME -->`` and ``<!-- /doc_numbers -->``; this
script owns it. Every block comes from the embedded model (no data beside the package is needed):

* ``first_result``, ``headline``: the tables of ``qk-subspace run`` with its defaults (6A, 6B, 6C), and the
  sentence under the README's figure;
* ``kmeans_restarts``: the perplexity ratio at k=8 over k-means seeds with 10 and with 100 restarts.

Speed figures are not here: they live in ``benchmarks/RESULTS.md`` (``benchmarks/bench_cli.py``).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
BLOCK = re.compile(r"(<!-- doc_numbers:(\w+) -->\n)(.*?)(<!-- /doc_numbers -->)", re.S)
SEEDS = 10
HEADLINE = ROOT / "docs" / "figures" / "exp6b_ppl_vs_K_stories260K.png"


def _ratio(x: float) -> str:
    return f"{x:.3f}x" if x < 10 else f"{x:.1f}x"


def first_result(png: bool) -> tuple[str, dict[str, Any]]:
    """The default run on the embedded model; its tables as markdown."""
    import qk_subspace as qs

    with tempfile.TemporaryDirectory() as tmp:
        res = qs.run_experiment("stories260K", tmp, progress=False, png=png)
        data = res.results
        png_path = Path(tmp) / "exp6b_ppl_vs_K_stories260K.png"
        if png and png_path.is_file():
            HEADLINE.parent.mkdir(exist_ok=True)
            shutil.copyfile(png_path, HEADLINE)
    var, proto = data["variance"], data["metadata"]["protocol"]
    thr = " · ".join(f"{100 * t['threshold']:.0f} %: K={t['K']}" for t in var["thresholds"])
    k_rows = data["perplexity_vs_k"]
    lines = [
        f"{var['n_heads']} heads, {proto['n_chunks']} chunks x {proto['ctx']} tokens of the model's own samples; "
        f"baseline perplexity {data['baseline']['ppl']:.4g}. Variance kept (6A): {thr}.",
        "",
        "| K | " + " | ".join(str(r["K"]) for r in k_rows) + " |",
        "|---|" + "---|" * len(k_rows),
        "| cumulative variance | "
        + " | ".join(f"{100 * r['cumulative_variance']:.1f}%" for r in k_rows)
        + " |",
        "| perplexity ratio (6B) | " + " | ".join(_ratio(r["ratio"]) for r in k_rows) + " |",
        "",
        "| clusters k (6C) | " + " | ".join(str(r["k"]) for r in data["clustering"]["rows"]) + " |",
        "|---|" + "---|" * len(data["clustering"]["rows"]),
        "| perplexity ratio | " + " | ".join(_ratio(r["ratio"]) for r in data["clustering"]["rows"]) + " |",
    ]
    return "\n".join(lines) + "\n", data


def kmeans_restarts() -> str:
    """The ratio at k=8 for k-means seeds 0..SEEDS-1, with 10 and with 100 restarts."""
    import qk_subspace as qs
    from qk_subspace.decomposition.plans import Plan
    from qk_subspace.model.embedded import embedded_tokens

    model = qs.load_model("stories260K")
    tokens = embedded_tokens()[0].reshape(-1, 256)
    heads = qs.representations.get("qk").heads(model)
    pca = qs.HeadPCA().fit(heads)
    base = qs.perplexity(model, tokens, progress=False)
    lines = []
    for n_init in (10, 100):
        clusterings = [qs.cluster_heads(pca, 8, n_dims=20, seed=seed, n_init=n_init) for seed in range(SEEDS)]
        plans = [Plan(f"seed {c.seed}", c.mixing()) for c in clusterings]
        df = qs.run_sweep(model, tokens, "qk", heads, plans, baseline=base, progress=False, n_boot=10)
        ratios = [float(r) for r in df["ratio"]]
        optima = {round(c.inertia, 6) for c in clusterings}
        lines.append(
            f"| {n_init} | {len(optima)} | {_ratio(min(ratios))} - {_ratio(max(ratios))} | "
            + ", ".join(_ratio(r) for r in ratios)
            + " |"
        )
    head = [
        f"| k-means restarts | distinct optima over {SEEDS} seeds | ratio at k=8: range | per seed 0..{SEEDS - 1} |",
        "|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def headline(data: dict[str, Any]) -> str:
    """The sentence under the README's headline figure."""
    rows = {r["K"]: r for r in data["perplexity_vs_k"]}
    k95 = next(t["K"] for t in data["variance"]["thresholds"] if t["threshold"] == 0.95)
    n = data["variance"]["n_heads"]
    within = min(k for k, r in rows.items() if r["ratio"] <= 1.1)
    at95 = f"{_ratio(rows[k95]['ratio'])}" if k95 in rows else "(K not evaluated)"
    return (
        "*The report's experiment on the model embedded in the package (`qk-subspace run`): 95 % of the "
        f"variance across heads (K={k95} of {n}) leaves a perplexity ratio of {at95}; the ratio first falls "
        f"within 1.1x at K={within}.*\n"
    )


def blocks(png: bool) -> dict[str, str]:
    tables, data = first_result(png)
    return {"first_result": tables, "headline": headline(data), "kmeans_restarts": kmeans_restarts()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    new = blocks(png=not check)
    stale = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")

        def replace(m: re.Match[str], path: Path = path) -> str:
            name = m.group(2)
            if name not in new:
                raise SystemExit(f"{path}: unknown block {name!r}")
            if m.group(3) != new[name]:
                stale.append(f"{path.relative_to(ROOT)}:{name}")
            return m.group(1) + new[name] + m.group(4)

        updated = BLOCK.sub(replace, text)
        if not check and updated != text:
            path.write_text(updated, encoding="utf-8")
    if check and stale:
        print("stale blocks (run python tools/doc_numbers.py):", ", ".join(stale))
        return 1
    print("checked" if check else "wrote", ", ".join(sorted(new)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
