"""Benchmark: ``qs.perplexity`` on a TransformerBridge (fast path) vs Hugging Face's sdpa forward.

    python benchmarks/bench_bridge.py --quick        # ~2 min on a 2-core CPU
    python benchmarks/bench_bridge.py                # [4, 1024] tokens per repetition

For a GPT-2-small-shaped and a Llama-shaped (grouped-query, rotary) model with random weights, saved as
local Hugging Face checkpoints, all in one run:
  * the bridge is ``qs.load_model(dir, backend="bridge")`` (compatibility mode, TransformerLens'
    default weight processing); the reference is the same checkpoint loaded by transformers with
    ``attn_implementation="sdpa"``, evaluated with the usual loop (logits -> per-token cross-entropy);
  * agreement of the per-chunk NLL of the fast path, the bridge's own (hooked) forward and HF sdpa;
  * throughput of the fast path and of HF sdpa, interleaved repetitions (order alternating), median and
    min-max, and their ratio (> 1: the fast path is faster); the bridge's own forward once.
Prints a markdown table and appends it to benchmarks/RESULTS.md (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from bench_eval import hf_chunk_nll
from common import qs

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _hf_model(kind: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        g = common.GPT2_SMALL_SHAPE
        cfg: Any = GPT2Config(
            n_layer=g["n_layers"], n_embd=g["d_model"], n_head=g["n_heads"], n_positions=g["n_ctx"],
            vocab_size=g["d_vocab"], activation_function="gelu_new",
        )  # fmt: skip
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _load_pair(kind: str, folder: Path) -> tuple[Any, Any]:
    """The bridge and an independent HF sdpa model of the same saved checkpoint."""
    from transformers import AutoModelForCausalLM

    from qk_subspace.model.embedded import EMBEDDED_DIR

    _hf_model(kind).save_pretrained(folder)
    bridge = qs.load_model(folder, backend="bridge", tokenizer=str(EMBEDDED_DIR))
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    return bridge, hf


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(kind: str, n: int, ctx: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        bridge, hf = _load_pair(kind, Path(d))
    tokens = torch.randint(0, int(bridge.cfg.d_vocab), (n, ctx), generator=torch.Generator().manual_seed(1))
    why = qs.model.fastpath.unsupported_reason(bridge)
    fast = qs.perplexity(bridge, tokens, batch_size=n, progress=False)
    ref = hf_chunk_nll(hf, tokens, n)
    std_s = _time(lambda: qs.perplexity(bridge, tokens, batch_size=n, progress=False, fast=False))
    std = qs.perplexity(bridge, tokens, batch_size=n, progress=False, fast=False)
    t_fast: list[float] = []
    t_hf: list[float] = []
    for r in range(reps):
        pair = [
            (t_fast, lambda: qs.perplexity(bridge, tokens, batch_size=n, progress=False)),
            (t_hf, lambda: hf_chunk_nll(hf, tokens, n)),
        ]
        for acc, fn in pair if r % 2 == 0 else pair[::-1]:
            acc.append(_time(fn))
    rel = lambda a, b: float(np.max(np.abs(a - b) / np.abs(b)))
    med_fast, med_hf = statistics.median(t_fast), statistics.median(t_hf)
    return {
        "kind": kind,
        "path": fast.path,
        "reason": why,
        "fast_vs_hf": rel(fast.nll_per_chunk, ref),
        "bridge_vs_hf": rel(std.nll_per_chunk, ref),
        "fast_tok_s": n * ctx / med_fast,
        "fast_range": (n * ctx / max(t_fast), n * ctx / min(t_fast)),
        "hf_tok_s": n * ctx / med_hf,
        "hf_range": (n * ctx / max(t_hf), n * ctx / min(t_hf)),
        "bridge_tok_s": n * ctx / std_s,
        "ratio": med_hf / med_fast,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="[2, 512] tokens, 3 repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    n, ctx = (2, 512) if args.quick else (4, 1024)
    reps = args.reps or (3 if args.quick else 5)
    rows = [measure(kind, n, ctx, reps) for kind in ("gpt2", "llama")]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/bench_bridge.py" + (" --quick" if args.quick else "")
    names = {"gpt2": "GPT-2 small shape", "llama": "Llama shape (12 x 12 heads, 4 KV heads, rotary)"}
    lines = [
        f"### {now} -- `{command}`",
        "",
        f"{common.machine_info()}; {common.versions()}; random weights, fp32, [{n}, {ctx}] tokens, "
        f"median of {reps} interleaved repetitions [min, max]",
        "",
        "| model | fast path tok/s | HF sdpa tok/s | fast / HF sdpa | bridge's own forward tok/s "
        "| max rel. NLL diff fast vs HF / bridge vs HF |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        assert r["path"] == "fast", r["reason"]
        lines.append(
            f"| {names[r['kind']]} | {r['fast_tok_s']:.0f} [{r['fast_range'][0]:.0f}, {r['fast_range'][1]:.0f}] "
            f"| {r['hf_tok_s']:.0f} [{r['hf_range'][0]:.0f}, {r['hf_range'][1]:.0f}] | {r['ratio']:.2f}x "
            f"| {r['bridge_tok_s']:.0f} | {r['fast_vs_hf']:.1e} / {r['bridge_vs_hf']:.1e} |"
        )
    common.publish(
        lines,
        args.no_append,
        "## TransformerBridge: the fast path vs Hugging Face sdpa",
        "Appended by `benchmarks/bench_bridge.py`, newest last. The ratio is HF sdpa's time over the "
        "fast path's, measured side by side in one run.",
    )


if __name__ == "__main__":
    main()
