"""Which attention heads break first when the QK circuits are compressed to K PCA components?

Sweeps K, compares every head's attention pattern with the original on a small diagnostic batch
(qs.evaluation.diagnostics.diagnostics_sweep), prints the heads that break first, and saves figures and a JSON summary.

Offline, on the embedded stories260K model and its own samples (default; options named as in
``qk-subspace run``)::

    python demos/inspect_heads.py --out results/inspect_heads

GPT-2 small by name (needs the Hugging Face hub or its cache), on WikiText-2 text::

    python demos/inspect_heads.py --model gpt2 --text-file ../shared/data/wikitext-2-raw/wiki.test.raw \
        --ks 1 10 32 64 100 130 144
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qk_subspace as qs
from qk_subspace.cli import flat_ints, int_list
from qk_subspace.experiment.inputs import load_tokens
from qk_subspace.viz import diagnostics as plots
from qk_subspace.viz import save_figure


def default_ks(n_heads: int) -> list[int]:
    """0, powers of two below n_heads, n_heads - 1 and n_heads."""
    ks = {0, n_heads - 1, n_heads}
    k = 1
    while k < n_heads:
        ks.add(k)
        k *= 2
    return sorted(ks)


def with_bos(model, chunks: torch.Tensor) -> torch.Tensor:
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    if bos is None or not model.cfg.default_prepend_bos:
        return chunks
    return torch.cat([torch.full((len(chunks), 1), int(bos), dtype=torch.long), chunks[:, :-1]], dim=1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="stories260K", help="stories260K (embedded), a local HF dir or a TL name"
    )
    ap.add_argument(
        "--text-file",
        default=None,
        help="text for the diagnostic batch (default: the embedded model's samples)",
    )
    ap.add_argument(
        "--ks", nargs="+", type=int_list("--ks"), default=None, help="K grid (default 0, powers of 2, all)"
    )
    ap.add_argument("--n-seqs", type=int, default=8, help="sequences in the diagnostic batch")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per diagnostic sequence")
    ap.add_argument(
        "--threshold", type=float, default=0.1, help="a head is broken when KL exceeds this (nats)"
    )
    ap.add_argument("--top", type=int, default=3, help="heads shown side by side")
    ap.add_argument(
        "--sample-tokens", type=int, default=32, help="length of the sample text in the pattern figure"
    )
    ap.add_argument(
        "--batch-size", type=int, default=None, help="sequences per micro-batch (default automatic)"
    )
    ap.add_argument("--out", default="results/inspect_heads")
    ap.add_argument("--docs-figure", default=None, help="also write the side-by-side PNG here (scale 1)")
    ap.add_argument("--no-png", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    model = qs.load_model(args.model)
    stream = load_tokens(model, args.text_file, None, 2).flatten()
    if model.tokenizer.bos_token_id is not None:
        stream = stream[stream != model.tokenizer.bos_token_id]
    # the figure's sample text comes first, the diagnostic batch right after it (no overlap)
    sample = with_bos(model, stream[None, : args.sample_tokens])
    diag = with_bos(
        model,
        qs.evaluation.diagnostics.diagnostic_batch(
            stream, args.n_seqs, args.ctx, skip_tokens=args.sample_tokens
        ),
    )

    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    ks = flat_ints(args.ks) or default_ks(pca.n_heads_)
    print(
        f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, "
        f"{pca.n_nonzero_components_} non-zero components; K grid {ks}; diagnostic batch {tuple(diag.shape)}"
    )
    t1 = time.perf_counter()
    long = qs.evaluation.diagnostics.diagnostics_sweep(model, pca, diag, ks, batch_size=args.batch_size)
    t_sweep = time.perf_counter() - t1

    summary = long.groupby("K").agg(
        mean_kl=("kl", "mean"),
        max_kl=("kl", "max"),
        mean_js=("js", "mean"),
        mean_tv=("tv", "mean"),
        mean_top1=("top1_agreement", "mean"),
        kl_floored=("kl_floored", "mean"),
    )
    print("\nper-K summary (KL, JS in nats; kl_floored = fraction of rows where KL is a lower bound):")
    print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    table = qs.evaluation.diagnostics.breaking_heads(long, threshold=args.threshold, top=10)
    out = Path(args.out)
    written: dict[str, dict[str, str]] = {}
    png = not args.no_png
    if table.empty:
        print(f"\nno head exceeds KL > {args.threshold} at any K")
    else:
        k_break = int(table.attrs["K_break"])
        print(f"\nheads that break first (KL > {args.threshold} at K={k_break}, the highest such K):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        at = long[long["K"] == k_break].set_index("label")
        top = [(int(r.layer), int(r.head)) for r in table.head(args.top).itertuples()]
        pairs = qs.head_patterns(model, sample, top, pca.reconstruct(k_break))
        labels = model.to_str_tokens(sample[0])
        titles = {lh: f"KL={at.loc[f'L{lh[0]}H{lh[1]}', 'kl']:.3g} at K={k_break}" for lh in top}
        fig = plots.plot_pattern_comparison(pairs, labels, titles=titles)
        written["patterns"] = save_figure(fig, out, "patterns_side_by_side", png=png)
        if args.docs_figure:
            Path(args.docs_figure).parent.mkdir(parents=True, exist_ok=True)
            fig.write_image(args.docs_figure, scale=1)
        written["breaking_table"] = save_figure(
            plots.plot_breaking_heads_table(table), out, "breaking_heads", png=png
        )
    written["kl_heatmap"] = save_figure(
        plots.plot_head_metric_heatmap(long, "kl"), out, "kl_heatmap", png=png
    )
    written["layer_kl_vs_k"] = save_figure(
        plots.plot_layer_metric_vs_k(long, "kl"), out, "layer_kl_vs_k", png=png
    )

    score_cols = ["previous_token", "duplicate_token", "induction"]
    base = long[long["K"] == ks[-1]].set_index("label")
    print("\nstrongest head of each type (scores on repeated random tokens, original -> edited at each K):")
    for name in score_cols:
        best = base[f"{name}_orig"].idxmax()
        path = ", ".join(
            f"K={k}: {v:.2f}" for k, v in long[long["label"] == best].set_index("K")[f"{name}_edited"].items()
        )
        print(f"  {name:16s} {best}: original {base.loc[best, f'{name}_orig']:.2f}; edited {path}")

    result = {
        "model": str(args.model),
        "text": str(args.text_file or "the model's own samples"),
        "ks": ks,
        "diag_batch": list(diag.shape),
        "threshold": args.threshold,
        "K_break": table.attrs.get("K_break"),
        "breaking_heads": qs.evaluation.diagnostics.diagnostics_to_records(table),
        "summary": qs.evaluation.diagnostics.diagnostics_to_records(summary.reset_index()),
        "attention_diagnostics": qs.evaluation.diagnostics.diagnostics_to_records(long),
        "figures": written,
        "seconds": {"sweep": round(t_sweep, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect_heads.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    print(
        f"\nsweep {t_sweep:.1f} s, total {time.perf_counter() - t0:.1f} s; wrote {out}/inspect_heads.json and figures"
    )
    return result


if __name__ == "__main__":
    main()
