"""Benchmark: qs.perplexity on a HookedTransformer vs a Hugging Face sdpa loop on the same weights.

    python benchmarks/bench_eval.py --quick          # ~3-5 min on a 2-core CPU
    python benchmarks/bench_eval.py                  # full run (RSS of a 195 x 1024 evaluation)
    python benchmarks/bench_eval.py --model DIR      # any local HF checkpoint, e.g.
                                                     # ../shared/data/models/stories260K

Measures, all in one run:
  * loss agreement of HF, TransformerLens' standard forward and the fast path on one chunk;
  * throughput of ``qs.perplexity`` (fast path) vs an equivalent HF loop (logits -> per-token
    cross-entropy -> per-chunk mean) on the same ``[n, ctx]`` tokens, interleaved A/B repetitions
    (order alternating), median and min-max spread, and the ratio; TransformerLens' standard
    forward once for reference;
  * the fp32 matmul peak (2048^3, best of 3, measured before every A/B repetition) and the achieved
    GFLOP/s of each loop (FLOPs per token from ``qs.model.fastpath.flops_per_token``) as a fraction of it;
  * peak RSS of evaluations of different numbers of chunks, each in a fresh subprocess;
  * the non-forward overhead of a sweep point (qk_matrices, PCA fit, reconstruct, inject, restore,
    gathering the fast path's weight views, k-means clustering) relative to one ctx-token evaluation.
Prints a markdown table and appends it to benchmarks/RESULTS.md (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import qs

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


# ----------------------------------------------------------------------------- loops
def hf_chunk_nll(hf: Any, tokens: torch.Tensor, batch_size: int) -> np.ndarray:
    """The HF perplexity loop: per-chunk mean next-token NLL ``[n]`` (float64)."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(tokens), batch_size):
            b = tokens[s : s + batch_size]
            logits = hf(b).logits
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(), reduction="none")
            out.append(nll.view(len(b), -1).double().mean(1))
    return torch.cat(out).numpy()


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------- RSS child
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def rss_child(args: argparse.Namespace) -> None:
    """Build the model, record RSS, evaluate ``tokens`` with qs.perplexity, print peak RSS (JSON)."""
    from transformer_lens import HookedTransformer

    base = _rss_kb("VmRSS")
    if args.model:
        model = qs.load_model(
            args.model,
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
        )
    else:
        model = HookedTransformer(common.gpt2_small_config()).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    after_model = _rss_kb("VmRSS")
    tokens = torch.load(args.rss_child, weights_only=True)
    t = time.perf_counter()
    res = qs.perplexity(model, tokens, batch_size=args.batch_size, progress=False)
    print(
        json.dumps(
            {
                "chunks": len(tokens),
                "batch_size": args.batch_size,
                "ctx": tokens.shape[1],
                "path": res.path,
                "seconds": time.perf_counter() - t,
                "rss_start_kb": base,
                "rss_model_kb": after_model,
                "peak_kb": _rss_kb("VmHWM"),
                "weights_bytes": weights,
            }
        )
    )


def run_rss(tokens: torch.Tensor, n: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "tokens.pt"
        torch.save(tokens[:n].clone(), f)
        cmd = [sys.executable, __file__, "--rss-child", str(f), "--batch-size", str(args.batch_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- profile
PROFILE_GROUPS = {
    "matmul (addmm/mm/bmm)": (
        "aten::addmm",
        "aten::addmm_",
        "aten::mm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::matmul",
    ),
    "attention (sdpa kernel)": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_cudnn_attention",
    ),
    "cross-entropy (log_softmax + nll, or in-place log-sum-exp)": (
        "aten::_log_softmax",
        "aten::nll_loss_forward",
        "aten::nll_loss_nd",
        "aten::amax",
        "aten::exp_",
        "aten::sub_",
        "aten::sum",
        "aten::log_",
        "aten::gather",
    ),
    "layer norms": ("aten::native_layer_norm", "aten::_fused_rms_norm"),
    "activation (gelu/silu)": ("aten::gelu_", "aten::gelu", "aten::silu_", "aten::silu"),
    "copies (bias broadcast, casts, cat)": ("aten::copy_", "aten::cat", "aten::clone"),
    "residual adds / elementwise": ("aten::add_", "aten::add", "aten::mul", "aten::mul_", "aten::index"),
}


def peak_bound(cfg: Any, ctx: int, tok_per_s: float, shares: dict[str, float], peak_gflops: float) -> float:
    """Fraction of ``peak_gflops`` the fast path would reach if its matmuls ran exactly at the peak.

    Keeps the profiled time of everything else (SDPA attention, cross-entropy, norms, activation,
    copies: ``1 - shares[matmul group]`` of the measured time per token) and replaces the matmul time
    by its FLOPs (all counted FLOPs but the attention mixing) at ``peak_gflops``.
    """
    total = qs.model.fastpath.flops_per_token(cfg, ctx)
    t_other = (1.0 - shares[next(iter(PROFILE_GROUPS))]) / tok_per_s
    t_best = (total - qs.model.fastpath.attention_mix_flops(cfg, ctx)) / (peak_gflops * 1e9) + t_other
    return total / t_best / (peak_gflops * 1e9)


def profile_fast(model: Any, tokens: torch.Tensor) -> list[tuple[str, float]]:
    """Share of the fast forward's self CPU time per op group (one micro-batch, torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from qk_subspace.model import fastpath

    fastpath.fast_chunk_nll(model, tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fastpath.fast_chunk_nll(model, tokens)
    by_name = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(by_name.values())
    shares = [(g, sum(by_name.get(n, 0.0) for n in names) / total) for g, names in PROFILE_GROUPS.items()]
    shares.append(("other", 1.0 - sum(v for _, v in shares)))
    return shares


# ----------------------------------------------------------------------------- sweep overhead
def sweep_overhead(model: Any, reps: int) -> dict[str, float]:
    """Median seconds of the non-forward steps of a sweep point."""
    from qk_subspace.model import fastpath

    times: dict[str, list[float]] = {
        k: []
        for k in (
            "qk_matrices",
            "pca_fit",
            "reconstruct",
            "inject",
            "restore",
            "fast_path_views",
            "kmeans_k16",
        )
    }
    for _ in range(reps):
        t = time.perf_counter()
        W = qs.qk_matrices(model)
        times["qk_matrices"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pca = qs.HeadPCA().fit(W)
        times["pca_fit"].append(time.perf_counter() - t)
        t = time.perf_counter()
        target = pca.reconstruct(K=min(100, pca.n_heads_))
        times["reconstruct"].append(time.perf_counter() - t)
        edit = qs.inject_qk(model, target)
        t = time.perf_counter()
        edit.__enter__()
        times["inject"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            fastpath.gather(model, model.cfg.n_ctx)
        times["fast_path_views"].append(time.perf_counter() - t)
        t = time.perf_counter()
        edit.__exit__(None, None, None)
        times["restore"].append(time.perf_counter() - t)
        t = time.perf_counter()
        common.cluster_targets(W, pca, min(16, pca.n_heads_ - 1))
        times["kmeans_k16"].append(time.perf_counter() - t)
    return {k: median(v) for k, v in times.items()}


def rss_row(r: dict[str, Any]) -> str:
    gib = 2**30
    w = r["weights_bytes"]
    return (
        f"| peak RSS, {r['chunks']} x {r['ctx']} evaluation, batch size {r.get('batch_size', '?')} "
        "(subprocess, "
        f"path {r['path']}, {r['seconds']:.0f} s) | "
        f"{r['peak_kb'] * 1024 / gib:.2f} GiB (weights {w / gib:.2f} GiB; process before model "
        f"{r['rss_start_kb'] * 1024 / gib:.2f} GiB; peak - weights = {(r['peak_kb'] * 1024 - w) / gib:.2f} "
        "GiB) | "
        f"<= weights + 1.5 GB |"
    )


def append_results(table: str) -> None:
    common.append_to_section(
        RESULTS,
        "## Evaluation performance: fast path vs Hugging Face",
        "Appended by `benchmarks/bench_eval.py`, newest last.",
        table,
    )


def rss_only(args: argparse.Namespace) -> None:
    """Peak RSS of qs.perplexity over ``--rss-chunks`` chunks, each count in a fresh subprocess."""
    load_before = common.load_average()
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        cfg = get_pretrained_model_config(args.model)
        ctx, d_vocab = min(1024, cfg.n_ctx), cfg.d_vocab
    else:
        tokenizer, ctx, d_vocab = common.gpt2_tokenizer(), 1024, 50257
    tokens, src = common.eval_tokens(tokenizer, ctx, d_vocab)
    counts = [int(x) for x in (args.rss_chunks or "4,195").split(",") if x]
    rows = []
    for n in counts:
        rows.append(rss_row(run_rss(tokens, n, args)))
        print(rows[-1], flush=True)
    cmd = "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])
    table = "\n".join(
        [
            f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — `{cmd.strip()}`",
            "",
            (
                f"- Peak RSS only ({src}, batch size {args.batch_size}); machine: {common.machine_info()}, "
                "shared "
                f"(load {load_before} before, {common.load_average()} after); {common.versions()}."
            ),
            "",
            "| measure | value | target |",
            "|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if not args.no_append:
        append_results(table)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="short run: fewer chunks/repetitions, small RSS runs"
    )
    ap.add_argument(
        "--model", default=None, help="local HF checkpoint dir (default: random GPT-2-small shape)"
    )
    ap.add_argument(
        "--chunks", type=int, default=None, help="chunks per timed evaluation (default 2; quick 1)"
    )
    ap.add_argument("--reps", type=int, default=None, help="interleaved A/B repetitions (default 5; quick 3)")
    ap.add_argument("--batch-size", type=int, default=2, help="chunks per forward, both loops (default 2)")
    ap.add_argument(
        "--rss-chunks",
        default=None,
        help="comma-separated chunk counts for the RSS subprocesses (default 4,195; quick 2,6)",
    )
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument(
        "--rss-only", action="store_true", help="only the peak-RSS subprocess runs (--rss-chunks)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    if args.rss_only:
        rss_only(args)
        return
    chunks = args.chunks or (1 if args.quick else 2)
    reps = args.reps or (3 if args.quick else 5)
    rss_counts = [int(x) for x in (args.rss_chunks or ("2,6" if args.quick else "4,195")).split(",") if x]
    load_before = common.load_average()
    t_start = time.perf_counter()

    # models and tokens
    if args.model:
        hf, tl = common.local_pair(args.model)
        tokenizer = tl.tokenizer
        label = f"local model {args.model}"
    else:
        hf, tl = common.gpt2_small_pair()
        tokenizer = common.gpt2_tokenizer()
        label = "GPT-2-small shape, random weights"
    ctx = min(1024, tl.cfg.n_ctx)
    tokens, token_src = common.eval_tokens(tokenizer, ctx, tl.cfg.d_vocab)
    n_params = sum(p.numel() for p in tl.parameters())
    flops_tok = qs.model.fastpath.flops_per_token(tl.cfg, ctx)
    print(
        f"{label}: {n_params / 1e6:.1f}M parameters, tokens {tuple(tokens.shape)} ({token_src}), "
        f"{flops_tok / 1e6:.1f} MFLOP/token; fast path: {qs.model.fastpath.unsupported_reason(tl) or 'supported'}"
    )

    # 1. loss agreement on one chunk
    one = tokens[:1]
    nll_hf = float(hf_chunk_nll(hf, one, 1)[0])
    nll_std = qs.perplexity(tl, one, progress=False, fast=False).mean_nll
    fast_one = qs.perplexity(tl, one, progress=False, fast=True)
    nll_fast = fast_one.mean_nll
    rel = {
        "hf_vs_standard": abs(nll_hf - nll_std) / abs(nll_std),
        "fast_vs_standard": abs(nll_fast - nll_std) / abs(nll_std),
        "fast_vs_hf": abs(nll_fast - nll_hf) / abs(nll_hf),
    }
    print(
        f"loss on 1 x {ctx}: HF {nll_hf:.8f}  TL standard {nll_std:.8f}  fast ({fast_one.path}) "
        f"{nll_fast:.8f}  " + "  ".join(f"{k} {v:.2e}" for k, v in rel.items())
    )

    # 2. interleaved A/B timing with the matmul peak measured before every repetition
    toks = tokens[:chunks]
    n_tok = toks.numel()
    t_fast: list[float] = []
    t_hf: list[float] = []
    peaks: list[float] = []
    run_fast = lambda: qs.perplexity(tl, toks, batch_size=args.batch_size, progress=False)
    run_hf = lambda: hf_chunk_nll(hf, toks, args.batch_size)
    run_fast()  # warm-up (builds the fused-weight cache)
    for r in range(reps):
        peaks.append(matmul_gflops())
        order = [("fast", run_fast), ("hf", run_hf)] if r % 2 == 0 else [("hf", run_hf), ("fast", run_fast)]
        for name, fn in order:
            (t_fast if name == "fast" else t_hf).append(timed(fn))
        print(
            f"rep {r}: fast {n_tok / t_fast[-1]:.1f} tok/s, HF {n_tok / t_hf[-1]:.1f} tok/s, "
            f"matmul {peaks[-1]:.1f} GFLOP/s, load {common.load_average()}"
        )
    t_std = (
        timed(lambda: qs.perplexity(tl, toks[:1], batch_size=1, progress=False, fast=False))
        / toks[:1].numel()
    )
    peaks.append(matmul_gflops())
    tps_fast = [n_tok / t for t in t_fast]
    tps_hf = [n_tok / t for t in t_hf]
    paired = [a / b for a, b in zip(t_hf, t_fast, strict=True)]
    peak_med, peak_max = median(peaks), max(peaks)

    prof = profile_fast(tl, toks[: args.batch_size])

    # 3. sweep-point overhead vs one ctx-token evaluation (fast path median)
    over = sweep_overhead(tl, reps=3 if args.quick else 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # the same steps on one thread: small ops suffer from OpenMP waits on a busy host
    over1 = sweep_overhead(tl, reps=3 if args.quick else 5)
    torch.set_num_threads(threads)
    one_eval = median(t_fast) / chunks
    point = over["reconstruct"] + over["inject"] + over["restore"] + over["fast_path_views"]

    # 4. peak RSS in fresh subprocesses
    rss = [run_rss(tokens, n, args) for n in rss_counts if n <= len(tokens)]
    wall = time.perf_counter() - t_start

    # ------------------------------------------------------------------ report
    cmd = "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])
    lines = [
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — `{cmd.strip()}`",
        "",
        (
            f"- Model: {label} ({n_params / 1e6:.1f}M parameters, fp32); tokens: {token_src}, "
            f"timed on {chunks} x {ctx} tokens per evaluation, batch size {args.batch_size}, {reps} "
            "interleaved A/B reps."
        ),
        (
            f"- Machine: {common.machine_info()}; load average {load_before} before, "
            f"{common.load_average()} after (a shared VM: absolute numbers are noisy, ratios are side by side)."
        ),
        f"- Versions: {common.versions()}.",
        (
            f"- FLOPs per token: {flops_tok / 1e6:.1f} M = 2 x (QKV+O+MLP weights per layer) x layers + "
            "causal attention "
            "4 x d_model x (ctx+1)/2 per layer + unembedding 2 x d_model x d_vocab (norms/activations not "
            "counted)."
        ),
        f"- Wall time of the whole run: {wall:.0f} s.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        (
            "| loss rel. diff HF vs TL standard / fast vs TL standard / fast vs HF | "
            f"{rel['hf_vs_standard']:.1e} / "
            f"{rel['fast_vs_standard']:.1e} / {rel['fast_vs_hf']:.1e} | < 1e-4 (fast vs standard < 1e-5) |"
        ),
        (
            f"| qs.perplexity (fast path) tok/s: median [min, max] | {median(tps_fast):.1f} "
            f"[{min(tps_fast):.1f}, "
            f"{max(tps_fast):.1f}] | |"
        ),
        (
            f"| HF {type(hf).__name__} (sdpa) loop tok/s: median [min, max] | {median(tps_hf):.1f} "
            f"[{min(tps_hf):.1f}, "
            f"{max(tps_hf):.1f}] | |"
        ),
        f"| TL standard forward (fast=False), 1 x {ctx}, once | {1 / t_std:.1f} tok/s | |",
        (
            f"| throughput ratio fast / HF: ratio of medians; paired per-rep median [min, max] | "
            f"{median(tps_fast) / median(tps_hf):.2f}x; {median(paired):.2f}x [{min(paired):.2f}, "
            f"{max(paired):.2f}] "
            f"| >= 1.0x |"
        ),
        f"| matmul peak 2048^3 fp32 GFLOP/s: median [max] | {peak_med:.1f} [{peak_max:.1f}] | |",
        (
            f"| achieved GFLOP/s fast / HF (median) | {median(tps_fast) * flops_tok / 1e9:.1f} / "
            f"{median(tps_hf) * flops_tok / 1e9:.1f} | |"
        ),
        (
            "| fraction of matmul peak fast / HF (vs median peak) | "
            f"{median(tps_fast) * flops_tok / 1e9 / peak_med:.0%} / "
            f"{median(tps_hf) * flops_tok / 1e9 / peak_med:.0%} | >= 80 % |"
        ),
        (
            "| best case if every matmul ran at the median peak (profiled non-matmul time kept) | "
            f"{peak_bound(tl.cfg, ctx, median(tps_fast), dict(prof), peak_med):.0%} of peak | |"
        ),
        f"| one {ctx}-token evaluation (fast path) | {one_eval:.2f} s | |",
    ]
    for k, v in over.items():
        lines.append(
            f"| overhead: {k} ({threads} threads; 1 thread) | {v * 1e3:.1f} ms = {v / one_eval:.2%} of one "
            "eval; "
            f"{over1[k] * 1e3:.1f} ms = {over1[k] / one_eval:.2%} | |"
        )
    point1 = over1["reconstruct"] + over1["inject"] + over1["restore"] + over1["fast_path_views"]
    lines.append(
        f"| overhead per 6B sweep point, 1 thread | {point1 * 1e3:.1f} ms = {point1 / one_eval:.2%} of one "
        f"{ctx}-token eval; {point1 / (one_eval * 195):.3%} of a 195-chunk eval | < 1 % |"
    )
    lines.append(
        f"| overhead per 6B sweep point (reconstruct+inject+restore+fast-path weight views) | {point * 1e3:.1f} ms = "
        f"{point / one_eval:.2%} of one {ctx}-token eval; {point / (one_eval * 195):.3%} of a 195-chunk eval "
        "| < 1 % |"
    )
    lines.append(
        f"| overhead per 6C sweep point (+ k-means k=16) | {(point + over['kmeans_k16']) * 1e3:.1f} ms = "
        f"{(point + over['kmeans_k16']) / one_eval:.2%} of one eval; "
        f"{(point + over['kmeans_k16']) / (one_eval * 195):.3%} of a 195-chunk eval | < 1 % |"
    )
    lines.append(
        f"| once per sweep (qk_matrices + PCA fit) | {(over['qk_matrices'] + over['pca_fit']) * 1e3:.1f} ms "
        "= "
        f"{(over['qk_matrices'] + over['pca_fit']) / one_eval:.2%} | |"
    )
    lines.append(
        "| where the fast forward's time goes (torch.profiler, self CPU time) | "
        + "; ".join(f"{g} {v:.0%}" for g, v in prof)
        + " | |"
    )
    for r in rss:
        lines.append(rss_row(r))
    if args.quick or max(rss_counts, default=0) < 195:
        lines.append("")
        lines.append(
            f"(RSS measured on {', '.join(str(r['chunks']) for r in rss)} chunks, not 195: "
            + ("`--quick`." if args.quick else "`--rss-chunks`.")
            + " Independence of the number of chunks is "
            "shown by the equal peaks; every chunk runs the same code with the same buffers.)"
        )
    table = "\n".join(lines)
    print()
    print(table)
    if not args.no_append:
        append_results(table)


if __name__ == "__main__":
    main()
