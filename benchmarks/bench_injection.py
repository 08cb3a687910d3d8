"""Sweep-point overhead of QK injection (issue 7): reconstruct + inject + restore on GPT-2 small.

Builds a GPT-2-small-shaped HookedTransformer (random weights, fp32), fits HeadPCA on its QK
circuits, then times per sweep point ``pca.reconstruct(100)``, entering ``qs.inject_qk`` and
leaving it (median of ``--reps``), first call (cold cache) reported separately, and one
1024-token evaluation (``qs.perplexity`` on a ``[1, 1024]`` random-token batch, fast path) in the
same run, for the ratio. Not a test; run e.g.::

    python benchmarks/bench_injection.py --threads 1
    python benchmarks/bench_injection.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # this checkout's qk_subspace, not an installed one

import torch
from common import gpt2_small_config
from transformer_lens import HookedTransformer

import qk_subspace as qs


def build() -> HookedTransformer:
    return HookedTransformer(gpt2_small_config(normalization_type="LNPre")).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--eval-reps", type=int, default=2)
    ap.add_argument("--K", type=int, default=100)
    ap.add_argument(
        "--injection-threads",
        default="1",
        help="qk_subspace.injection.INJECTION_THREADS for this run: an int or 'none' (torch's setting)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qk_subspace import injection

    if hasattr(injection, "INJECTION_THREADS"):  # absent before the optimisation
        injection.INJECTION_THREADS = (
            None if args.injection_threads == "none" else int(args.injection_threads)
        )
    model = build()
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)

    def point() -> tuple[float, float, float, float]:
        t0 = time.perf_counter()
        target = pca.reconstruct(args.K)
        t1 = time.perf_counter()
        edit = qs.inject_qk(model, target)
        edit.__enter__()
        t2 = time.perf_counter()
        edit.__exit__(None, None, None)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, float(edit.residual.max())

    first = point()
    rows = [point() for _ in range(args.reps)]
    rec, inj, res = (median(r[i] for r in rows) for i in range(3))
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 1024), generator=torch.Generator().manual_seed(0))
    evals = []
    for _ in range(args.eval_reps):
        t = time.perf_counter()
        qs.perplexity(model, tokens, batch_size=1, progress=False, fast=True)
        evals.append(time.perf_counter() - t)
    one_eval = median(evals)
    total = rec + inj + res
    print(f"qk_subspace from {qs.__file__}")
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, reps={args.reps}, "
        f"INJECTION_THREADS={getattr(injection, 'INJECTION_THREADS', '(not in this version)')}"
    )
    print(
        f"first point (cold): reconstruct {first[0] * 1e3:.1f} ms, inject {first[1] * 1e3:.1f} ms, "
        f"restore {first[2] * 1e3:.1f} ms"
    )
    print(
        f"median point: reconstruct {rec * 1e3:.1f} ms, inject {inj * 1e3:.1f} ms, restore {res * 1e3:.1f} ms, "
        f"total {total * 1e3:.1f} ms (max residual {rows[-1][3]:.2e})"
    )
    print(f"one 1024-token evaluation: {one_eval:.2f} s (median of {args.eval_reps}; {evals})")
    print(
        f"sweep-point overhead = {total / one_eval:.2%} of one 1024-token evaluation "
        f"(inject+restore alone {(inj + res) / one_eval:.2%})"
    )


if __name__ == "__main__":
    main()
