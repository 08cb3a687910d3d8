"""Peak memory of qs.attention_diagnostics on a GPT-2-small-shaped model (random weights).

Each measurement runs in a fresh subprocess: build the model (12 layers, d_model 768, 12 heads,
d_head 64, d_mlp 3072, n_ctx 1024, d_vocab 50257, gelu_new, LayerNorm), run one short warm-up,
reset the peak resident set size (Linux ``/proc/self/clear_refs``), run the measured call, and
report ``VmHWM - VmRSS before`` (the extra peak RSS of the call). Compared with the size of all
144 patterns of a 4 x 1024 batch held at once (``4 * 144 * 1024 * 1024 * 4`` bytes, float32).

    python benchmarks/bench_diagnostics.py                 # diagnostics at batch_size 4 and 1
    python benchmarks/bench_diagnostics.py --forward --full-cache   # also: a plain forward, all patterns cached
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

GPT2_SHAPE = {
    "n_layers": 12,
    "d_model": 768,
    "n_heads": 12,
    "d_head": 64,
    "d_mlp": 3072,
    "n_ctx": 1024,
    "d_vocab": 50257,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(mode: str, batch_size: int, n_seqs: int, ctx: int) -> None:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import qk_subspace as qs

    torch.set_grad_enabled(False)
    model = HookedTransformer(HookedTransformerConfig(seed=0, device="cpu", **GPT2_SHAPE))
    model.eval()
    toks = torch.randint(0, 50257, (n_seqs, ctx), generator=torch.Generator().manual_seed(0))
    target = qs.HeadPCA().fit(qs.qk_matrices(model)).reconstruct(10)
    # warm-up on a tiny input (allocator, lazy init), then reset the peak
    qs.attention_diagnostics(model, toks[:1, :16], target, head_scores=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "diagnostics":
        df = qs.attention_diagnostics(model, toks, target, batch_size=batch_size)
        extra = {"max_kl": float(df["kl"].max())}
    elif mode == "forward":  # one plain forward pass of the model (logits), for scale
        logits = model(toks)
        extra = {"logits_bytes": int(logits.numel() * logits.element_size())}
        del logits
    else:  # all 144 patterns of the batch at once (original pass only)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
        extra = {"cached_bytes": int(sum(v.numel() * v.element_size() for v in cache.values()))}
    secs = time.perf_counter() - t0
    peak = _status("VmHWM")
    print(
        json.dumps(
            {
                "mode": mode,
                "batch_size": batch_size,
                "n_seqs": n_seqs,
                "ctx": ctx,
                "extra_peak_bytes": peak - rss0,
                "rss_before": rss0,
                "seconds": round(secs, 1),
                **extra,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[4, 1])
    ap.add_argument("--n-seqs", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--full-cache", action="store_true")
    ap.add_argument("--forward", action="store_true", help="also: one plain forward pass")
    ap.add_argument("--bs", type=int, default=4)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bs, args.n_seqs, args.ctx)
        return
    runs = [("diagnostics", bs) for bs in args.batch_sizes]
    if args.forward:
        runs.append(("forward", args.n_seqs))
    if args.full_cache:
        runs.append(("full_cache", args.n_seqs))
    all_patterns = args.n_seqs * 144 * args.ctx * args.ctx * 4
    print(f"all 144 patterns of {args.n_seqs} x {args.ctx} at once (float32): {all_patterns / 2**30:.2f} GiB")
    for mode, bs in runs:
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--bs",
                    str(bs),
                    "--n-seqs",
                    str(args.n_seqs),
                    "--ctx",
                    str(args.ctx),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        res = json.loads(out)
        res["fraction_of_all_patterns"] = round(res["extra_peak_bytes"] / all_patterns, 3)
        print(json.dumps(res))
        print(
            f"  {mode} batch_size={bs}: extra peak RSS {res['extra_peak_bytes'] / 2**20:.0f} MiB "
            f"({res['fraction_of_all_patterns']:.1%} of all patterns), {res['seconds']} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
