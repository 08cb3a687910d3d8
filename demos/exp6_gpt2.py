"""Reproduce the seed report (exp6_report_ja.md) end to end for GPT-2 small, and GPT-2 medium behind the gate.

Needs internet the first time (the model from the Hugging Face hub, WikiText-2 via `datasets`); give
``--text-file path/to/wiki.test.raw`` to read WikiText-2 from disk instead (identical tokens).

    python demos/exp6_gpt2.py --out results            # same as: qk-subspace run --model gpt2 gpt2-medium --out results

Protocol (the report's): WikiText-2 raw test rows joined with "\\n\\n", no BOS, first 200,000 tokens cut
into 195 chunks x 1024; K grid 1, 3, 10, 32, 64, 80, 100, 110, 120, 130, 140, 144 (144 = all components);
k-means k = 4, 8, 12, 16, 32, 64 on the top-20 PCA coefficients. GPT-2 medium runs only if GPT-2 small's
perplexity ratio at K=10 is within 1.1x (the report's gate; it was 40x, so the report skipped it).
Resumable: rerun with ``--resume`` after an interruption. Takes hours on a CPU; use ``--device cuda``.
"""

from __future__ import annotations

import argparse

import qk_subspace as qs
from qk_subspace.report import format_tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: TransformerLens' choice)")
    p.add_argument("--text-file", default=None, help="local wiki.test.raw (default: WikiText-2 via datasets)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-medium", action="store_true", help="GPT-2 small only")
    args = p.parse_args()

    config = qs.ExperimentConfig(
        text_file=args.text_file,
        n_tokens=200_000,
        ctx=1024,
        batch_size=args.batch_size,
        ks=None,  # the report's grid (scaled to 384 heads for GPT-2 medium)
        cluster_ks=qs.decomposition.clustering.REPORT_CLUSTER_GRID,
        n_dims=20,
        seed=0,
        device=args.device,
        gate_k=10,
        gate_threshold=1.1,
        resume=args.resume,
    )
    models = ["gpt2"] if args.no_medium else ["gpt2", "gpt2-medium"]
    done, skipped = qs.run_models(models, args.out, config)
    for res in done:
        print(format_tables(res.results))
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    print(f"report: {args.out}/report.md (GPT-2 small's table shows the seed report's numbers side by side)")


if __name__ == "__main__":
    main()
