"""The seed report's full sweep on a GPT-2-small-shaped model, timed (the GPU check).

    python benchmarks/gpu_sweep.py             # CUDA: fp32 and bf16, 195 x 1024 tokens per evaluation
    python benchmarks/gpu_sweep.py --quick     # CPU smoke run with a tiny token budget (known to work)
    python benchmarks/gpu_sweep.py --dtypes fp32 --batch-size 64 --standard-too

Per dtype: baseline + the 6B grid (K = 1 ... 144, PCA reconstruction) + the 6C grid (k-means with
k = 4 ... 64 on the top-20 PCA coefficients, each head replaced by its cluster's representative),
every point an exact ``qs.inject_qk`` edit evaluated with ``qs.perplexity`` (fast path) on the same
tokens (WikiText-2 test, 199,680 tokens, GPT-2 tokenizer from ../shared; random tokens if absent).
Prints the wall time and tokens/s of every evaluation, the non-forward time, and the total.
The model has random weights (GPT-2 small's shape): the timings are what matter, not the perplexities.
The 6C clustering here is sklearn KMeans on PCA coordinates (benchmarks/common.py), a stand-in for
``qk_subspace.clustering``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import qs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_dtype(dtype_name: str, tokens: torch.Tensor, args: argparse.Namespace) -> tuple[list[str], float]:
    from transformer_lens import HookedTransformer

    device = args.device
    torch.manual_seed(0)
    model = HookedTransformer(common.gpt2_small_config(DTYPES[dtype_name], device)).eval()
    toks = tokens.to(device)
    n_tok = toks.numel()
    rows: list[str] = []
    t_all = time.perf_counter()

    def evaluate(label: str, fast: bool = True) -> qs.PerplexityResult:
        sync(device)
        t = time.perf_counter()
        res = qs.perplexity(model, toks, batch_size=args.batch_size, progress=False, fast=fast)
        sync(device)
        dt = time.perf_counter() - t
        rows.append(f"| {dtype_name} | {label} | {res.path} | {dt:.2f} | {n_tok / dt:,.0f} | {res.ppl:.4g} |")
        print(rows[-1], flush=True)
        return res

    t = time.perf_counter()
    W = qs.qk_matrices(model)
    pca = qs.HeadPCA().fit(W)
    non_forward = time.perf_counter() - t
    evaluate("warm-up (not counted)")
    rows.pop()
    t_sweep = time.perf_counter()
    base = evaluate("baseline")
    if args.standard_too:
        evaluate("baseline, TransformerLens standard forward (fast=False)", fast=False)
    k_all_ratio = None
    for K in common.K_GRID:
        t = time.perf_counter()
        target = pca.reconstruct(K=min(K, pca.n_heads_)).to(device)
        with qs.inject_qk(model, target) as edit:
            non_forward += time.perf_counter() - t
            res = evaluate(f"6B K={K}")
            t = time.perf_counter()
        non_forward += time.perf_counter() - t
        del edit
        if pca.n_nonzero_components_ <= K:
            k_all_ratio = res.ppl / base.ppl
    for k in common.CLUSTER_GRID:
        t = time.perf_counter()
        target = common.cluster_targets(W, pca, min(k, pca.n_heads_ - 1)).to(device)
        with qs.inject_qk(model, target):
            non_forward += time.perf_counter() - t
            evaluate(f"6C k={k}")
            t = time.perf_counter()
        non_forward += time.perf_counter() - t
    sweep = time.perf_counter() - t_sweep
    n_eval = 1 + len(common.K_GRID) + len(common.CLUSTER_GRID)
    rows.append(
        f"| {dtype_name} | **full sweep: {n_eval} evaluations x {n_tok:,} tokens** | | **{sweep:.1f}** | "
        f"{n_eval * n_tok / sweep:,.0f} | non-forward {non_forward:.2f} s; K=all ratio "
        f"{k_all_ratio if k_all_ratio is None else f'{k_all_ratio:.6f}'} |"
    )
    print(rows[-1], flush=True)
    print(
        f"{dtype_name}: total incl. model build and warm-up {time.perf_counter() - t_all:.1f} s", flush=True
    )
    model.cpu()  # free the device memory before the next dtype
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows, sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, fp32, 2 chunks x 64 tokens per evaluation")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument(
        "--dtypes", default=None, help="comma-separated: fp32,bf16,fp16 (default fp32,bf16; quick fp32)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=None, help="chunks per forward (default 32 on CUDA, 2 on CPU)"
    )
    ap.add_argument(
        "--n-tokens", type=int, default=None, help="evaluation tokens (default 200,000 -> 195 x 1024)"
    )
    ap.add_argument("--ctx", type=int, default=None, help="chunk length (default 1024; quick 64)")
    ap.add_argument(
        "--standard-too", action="store_true", help="also time one baseline with the standard forward"
    )
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if args.batch_size is None:
        args.batch_size = 32 if args.device.startswith("cuda") else 2
    ctx = args.ctx or (64 if args.quick else 1024)
    n_tokens = args.n_tokens or (2 * ctx if args.quick else 200_000)
    dtypes = (args.dtypes or ("fp32" if args.quick else "fp32,bf16")).split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; allowed {sorted(DTYPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here; use --quick (CPU) or --device cpu")
    tokens, src = common.eval_tokens(common.gpt2_tokenizer(), ctx, 50257, n_tokens=n_tokens)
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else common.machine_info()
    print(
        f"device {args.device} ({dev_name}); tokens {tuple(tokens.shape)} ({src}); batch size "
        f"{args.batch_size}"
    )
    header = [
        "| dtype | evaluation | path | wall s | tokens/s | ppl (random weights) |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(header))
    rows: list[str] = []
    totals = {}
    for d in dtypes:
        r, total = run_dtype(d, tokens, args)
        rows += r
        totals[d] = total
    cmd = "python benchmarks/gpu_sweep.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — `{cmd.strip()}`",
            "",
            (
                f"- Device: {args.device} ({dev_name}); tokens {tuple(tokens.shape)} ({src}); batch size "
                f"{args.batch_size}."
            ),
            f"- Versions: {common.versions()}.",
            "- Full sweep wall time: "
            + ", ".join(f"{d} {t:.1f} s" for d, t in totals.items())
            + " (target on an H200: < 60 s for fp32 and bf16 each at 195 x 1024)."
            + ("" if not args.quick else " `--quick`: tiny CPU budget."),
            "",
            *header,
            *rows,
        ]
    )
    print()
    print(text)
    if args.append:
        common.append_to_section(
            Path(__file__).resolve().parent / "RESULTS.md",
            "## GPU sweep timing",
            "Appended by `benchmarks/gpu_sweep.py`, newest last.",
            text,
        )


if __name__ == "__main__":
    main()
