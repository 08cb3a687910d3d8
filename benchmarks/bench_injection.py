"""Sweep-point overhead of QK injection: reconstruct + inject + restore on GPT-2 small.

Builds a GPT-2-small-shaped HookedTransformer (random weights, fp32), fits HeadPCA on its QK
circuits, then times per sweep point ``pca.reconstruct(100)``, entering ``qs.inject_qk`` and
leaving it (median of ``--reps``), first call (cold cache) reported separately, and one
1024-token evaluation (``qs.perplexity`` on a ``[1, 1024]`` random-token batch, fast path) in the
same run, for the ratio. Not a test; run e.g.::

    python benchmarks/bench_injection.py --threads 1
    python benchmarks/bench_injection.py --threads 2

It also measures the floor of *any* exact float64 injection on this machine (the bare float64 product
and the parameter traffic alone, see :func:`floor`) against the same evaluation.
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


def floor(model: HookedTransformer, reps: int) -> tuple[float, float]:
    """Lower bounds for any exact injection of every head, in seconds (medians of ``reps``).

    * the one product an exact float64 injection cannot avoid, ``M D^T`` per head with
      ``M = W_K (W_K^T W_K)^{-1}`` ``[d_model, d_head]`` and ``D = (T - W_Q^T W_K)`` ``[d_head, d_head]``,
      both float64 and ready (no casts, no solve, no residual): 2 x d_model x d_head^2 FLOPs per head;
    * the parameter traffic of an edit: snapshot ``W_Q``, write the new values, write the snapshot back
      (done on scratch tensors of the same size, not on the model).
    """
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    Ms = [b.attn.W_K.detach().to(torch.float64).contiguous() for b in model.blocks]
    Ds = [torch.randn(cfg.n_heads, cfg.d_head, cfg.d_head, generator=g, dtype=torch.float64) for _ in Ms]
    Wq = [b.attn.W_Q.detach() for b in model.blocks]
    scratch = [torch.empty_like(w) for w in Wq]
    prod, traffic = [], []
    for _ in range(reps + 1):
        t = time.perf_counter()
        for M, D in zip(Ms, Ds, strict=True):
            M @ D.transpose(-1, -2)
        prod.append(time.perf_counter() - t)
        t = time.perf_counter()
        for w, out in zip(Wq, scratch, strict=True):
            snap = w.clone()
            out.copy_(w)
            out.copy_(snap)
        traffic.append(time.perf_counter() - t)
    return median(prod[1:]), median(traffic[1:])


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
    from qk_subspace.edits import qk as injection

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
        return t1 - t0, t2 - t1, t3 - t2, float(edit.max_abs_error.max())

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
    f_prod, f_traffic = floor(model, args.reps)
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
    print(
        f"floor of any exact float64 injection: the bare product M D^T {f_prod * 1e3:.1f} ms + W_Q snapshot, "
        f"write and restore {f_traffic * 1e3:.1f} ms = {(f_prod + f_traffic) * 1e3:.1f} ms = "
        f"{(f_prod + f_traffic) / one_eval:.2%} of one 1024-token evaluation (target < 1 %)"
    )


if __name__ == "__main__":
    main()
