"""Does ``torch.compile`` pay for the fast path?

Compiles the fast path's residual-stream forward (``fastforward.residual_final``, the
layers without the unembedding/cross-entropy) of a GPT-2-small-shaped model with inductor, checks
it against the eager function, and times both interleaved on ``[batch, 1024]`` random tokens::

    python benchmarks/bench_compile.py              # prints a table; --append adds it to RESULTS.md

Not a test: compiling takes tens of seconds on a 2-core CPU and needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qk_subspace
import common
import torch
from transformer_lens import HookedTransformer

from qk_subspace.model import fastforward, fastpath

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = HookedTransformer(common.gpt2_small_config()).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, 1024))
    weights = fastpath.gather(model, tokens.shape[1])

    def eager(toks: torch.Tensor) -> torch.Tensor:
        return fastforward.residual_final(weights, toks)

    compiled = torch.compile(eager, dynamic=False)
    with torch.inference_mode():
        t = time.perf_counter()
        out_c = compiled(tokens)
        compile_s = time.perf_counter() - t
        out_e = eager(tokens)
        max_diff = float((out_c - out_e).abs().max())
        te: list[float] = []
        tc: list[float] = []
        for r in range(args.reps):
            for fn, acc in ((eager, te), (compiled, tc)) if r % 2 == 0 else ((compiled, tc), (eager, te)):
                t = time.perf_counter()
                fn(tokens)
                acc.append(time.perf_counter() - t)
    n_tok = tokens.numel()
    table = "\n".join(
        [
            f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC -- `python benchmarks/bench_compile.py`",
            "",
            f"- Machine: {common.machine_info()}; load before/after: {common.load_average()}.",
            f"- Versions: {common.versions()}.",
            f"- GPT-2-small shape, random weights, fp32, tokens {tuple(tokens.shape)}, {args.reps} interleaved reps;"
            " the layers only (no unembedding / cross-entropy).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| first compiled call (compile + run) | {compile_s:.1f} s |",
            f"| max abs diff compiled vs eager (residual stream) | {max_diff:.2e} |",
            f"| eager: median [min, max] | {median(te):.3f} s [{min(te):.3f}, {max(te):.3f}] "
            f"= {n_tok / median(te):.0f} tok/s |",
            f"| compiled: median [min, max] | {median(tc):.3f} s [{min(tc):.3f}, {max(tc):.3f}] "
            f"= {n_tok / median(tc):.0f} tok/s |",
            f"| speed-up compiled / eager (ratio of medians) | {median(te) / median(tc):.3f}x |",
        ]
    )
    print(table)
    if args.append:
        common.append_to_section(
            RESULTS,
            "## torch.compile of the fast path",
            "Appended by `benchmarks/bench_compile.py`, newest last.",
            table,
        )


if __name__ == "__main__":
    main()
