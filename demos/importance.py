"""Function-aware component ranking and importance-ordered compression, end to end.

Offline on the embedded stories260K model and its own samples (default); any model with ``--model`` and
``--text-file`` (options named as in ``qk-subspace run``)::

    python demos/importance.py --out results/importance_qk
    python demos/importance.py --circuit ov --out results/importance_ov

GPT-2 small by name (needs the Hugging Face hub or its cache) on WikiText-2::

    python demos/importance.py --model gpt2 --ctx 1024 --rank-tokens 16384 --eval-tokens 65536 --ks report \\
        --text-file ../shared/data/wikitext-2-raw/wiki.test.raw --out results/importance_gpt2

Steps: fit HeadPCA on the circuit matrices; rank the components by drop-one perplexity change and
by gradient (first-order Taylor, empirical Fisher) on *ranking* tokens; report the Spearman rank
correlations; sweep K with variance order and with importance order on *disjoint evaluation*
tokens (so the ordering is not scored on the text it was chosen on); find where each curve
reaches 1.1x; per-head ablation of the compression at one K (heatmap, on the ranking tokens); for OV also the relative
change of every head's output. Writes ``importance.json`` and figures (HTML + PNG) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qk_subspace as qs
from qk_subspace.experiment.inputs import load_tokens
from qk_subspace.viz import save_figure
from qk_subspace.viz.importance import SEED_REPORT_RATIOS

ROOT = Path(__file__).resolve().parents[1]


def _records(df: Any) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def replot(out: Path) -> dict[str, Any]:
    """Redraw the figures of a finished run from its ``importance.json`` (no model needed)."""
    import pandas as pd

    r = json.loads((out / "importance.json").read_text())
    sw_var, sw_imp = pd.DataFrame(r["sweep_variance"]), pd.DataFrame(r["sweep_importance"])
    fig = qs.viz.importance.importance_overlay_figure(
        sw_var,
        sw_imp,
        reference=SEED_REPORT_RATIOS,
        reference_scale=r["n_heads"] / 144,
        title=f"{Path(r['model']).name} {r['circuit'].upper()}: perplexity vs K, variance vs importance order",
    )
    r["figures"] = {"overlay": save_figure(fig, out, f"overlay_{r['circuit']}")}
    heads = pd.DataFrame(r["head_importance"]["rows"])
    heads.attrs.update(
        {"mode": r["head_importance"]["mode"], "K": r["head_importance"]["K"], "circuit": r["circuit"]}
    )
    r["figures"]["heads"] = save_figure(
        qs.viz.importance.head_importance_figure(heads),
        out,
        f"heads_{r['circuit']}_K{r['head_importance']['K']}",
    )
    (out / "importance.json").write_text(json.dumps(_jsonable(r), indent=1))
    return r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="stories260K", help="stories260K (embedded), a local HF dir or a TL name"
    )
    ap.add_argument(
        "--text-file",
        default=None,
        help="text (a wiki.*.raw is WikiText-2); default: the embedded model's samples",
    )
    ap.add_argument("--circuit", choices=("qk", "ov"), default="qk")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--rank-tokens", type=int, default=8192, help="tokens for drop-one / gradient ranking")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="tokens for the K sweeps (disjoint)")
    ap.add_argument(
        "--ks",
        nargs="+",
        default=["all"],
        help="K values (1,3,10 or 1 3 10), 'all' (0..n_heads) or 'report' (0 + the seed report's grid)",
    )
    ap.add_argument("--head-mode", choices=["only", "all_but"], default="only")
    ap.add_argument("--score", default=None, help="drop-one column to order by (default delta_nll)")
    ap.add_argument("--head-k", type=int, default=None, help="K for head-level ablation (default: half)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/importance")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redraw the figures of the run in --out")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(Path(args.out))
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    model = qs.load_model(args.model)
    need = args.rank_tokens + args.eval_tokens
    toks = load_tokens(model, args.text_file, None, args.ctx)
    n_rank, n_eval = args.rank_tokens // args.ctx, args.eval_tokens // args.ctx
    if n_rank < 2 or n_eval < 2 or len(toks) * args.ctx < need:
        raise SystemExit(
            f"need >= 2 chunks each for ranking and evaluation and {need} tokens; text has {toks.numel()}"
        )
    rank_toks, eval_toks = toks[:n_rank], toks[n_rank : n_rank + n_eval]
    print(
        f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads; "
        f"ranking on {tuple(rank_toks.shape)}, evaluating on {tuple(eval_toks.shape)} (disjoint)"
    )

    W = qs.representations.get(args.circuit).matrices(model)
    pca = qs.HeadPCA().fit(W)
    print(
        f"{args.circuit.upper()} PCA: {pca.n_heads_} heads, {pca.n_nonzero_components_} non-zero components"
    )

    # 1-2. rankings
    t = time.time()
    drop = qs.component_importance(
        model,
        pca,
        rank_toks,
        "drop_one",
        representation=args.circuit,
        batch_size=args.batch_size,
        progress=progress,
    )
    t_drop = time.time() - t
    t = time.time()
    grad = qs.component_importance(
        model, pca, rank_toks, "gradient", representation=args.circuit, progress=progress
    )
    t_grad = time.time() - t
    score = args.score or "delta_nll"
    corr = {
        s: qs.evaluation.importance.rank_correlation(drop, grad, score, s)
        for s in ("fisher", "taylor", "taylor_abs", "taylor_fisher")
    }
    corr["explained_variance_ratio"] = qs.evaluation.importance.rank_correlation(
        drop, drop, score, "explained_variance_ratio"
    )
    for k, v in corr.items():
        print(f"Spearman(drop-one {score}, {k}) = {v['spearman']:+.3f} (p={v['p_value']:.2g}, n={v['n']})")
    order = qs.evaluation.importance.importance_order(drop, score)
    print("importance order (drop-one):", order)

    # 3. sweeps
    n_all = pca.n_heads_
    if args.ks == ["all"]:
        ks = list(range(n_all + 1))
    elif args.ks == ["report"]:
        ks = [0, *[k for k in qs.evaluation.sweeps.REPORT_K_GRID if k < n_all], n_all]
    else:
        ks = [int(k) for part in args.ks for k in part.split(",") if k.strip()]
    baseline = qs.perplexity(model, eval_toks, batch_size=args.batch_size, progress=progress, desc="baseline")
    common = {
        "batch_size": args.batch_size,
        "progress": progress,
        "baseline": baseline,
        "representation": args.circuit,
    }
    t = time.time()
    sw_var = qs.sweep_k(model, pca, eval_toks, ks, order="variance", **common)
    sw_imp = qs.sweep_k(model, pca, eval_toks, ks, order="importance", importance=order, **common)
    t_sweeps = time.time() - t
    reach = {
        "variance": qs.evaluation.importance.k_reaching(sw_var, 1.1),
        "importance": qs.evaluation.importance.k_reaching(sw_imp, 1.1),
    }
    print(
        f"baseline ppl {baseline.ppl:.4f}; K reaching 1.1x: variance {reach['variance']}, "
        f"importance {reach['importance']}"
    )
    fig = qs.viz.importance.importance_overlay_figure(
        sw_var,
        sw_imp,
        reference=SEED_REPORT_RATIOS,
        reference_scale=n_all / 144,
        title=f"{Path(args.model).name} {args.circuit.upper()}: perplexity vs K, variance vs importance order",
    )
    figures = {"overlay": save_figure(fig, out, f"overlay_{args.circuit}")}

    # 4. head level
    head_k = args.head_k if args.head_k is not None else pca.n_nonzero_components_ // 2
    t = time.time()
    heads = qs.evaluation.importance.head_importance(
        model,
        pca,
        rank_toks,
        K=head_k,
        mode=args.head_mode,
        representation=args.circuit,
        batch_size=args.batch_size,
        progress=progress,
    )
    t_heads = time.time() - t
    figures["heads"] = save_figure(
        qs.viz.importance.head_importance_figure(heads), out, f"heads_{args.circuit}_K{head_k}"
    )
    top = heads.sort_values("ratio", ascending=False).head(5)
    print(
        f"heads whose compression at K={head_k} costs most:",
        ", ".join(f"{r.label} {r.ratio:.3f}x" for r in top.itertuples()),
    )

    result: dict[str, Any] = {
        "model": args.model,
        "circuit": args.circuit,
        "ctx": args.ctx,
        "rank_tokens_shape": list(rank_toks.shape),
        "eval_tokens_shape": list(eval_toks.shape),
        "n_heads": n_all,
        "n_nonzero_components": pca.n_nonzero_components_,
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        "baseline_ppl_eval": baseline.ppl,
        "drop_one": _records(drop),
        "drop_one_attrs": dict(drop.attrs),
        "gradient": _records(grad),
        "gradient_attrs": dict(grad.attrs),
        "rank_correlation": corr,
        "ordering_score": score,
        "orderings": {
            "variance": sw_var.attrs["component_order"],
            "importance": sw_imp.attrs["component_order"],
            "gradient_fisher": qs.evaluation.importance.importance_order(grad, "fisher"),
        },
        "sweep_variance": _records(sw_var),
        "sweep_variance_attrs": dict(sw_var.attrs),
        "sweep_importance": _records(sw_imp),
        "sweep_importance_attrs": dict(sw_imp.attrs),
        "k_reaching_1.1": reach,
        "head_importance": {
            "K": head_k,
            "mode": args.head_mode,
            "rows": _records(heads),
            "matrix_ratio": qs.evaluation.importance.head_importance_matrix(heads).tolist(),
        },
        "figures": figures,
        "seconds": {
            "drop_one": t_drop,
            "gradient": t_grad,
            "sweeps": t_sweeps,
            "heads": t_heads,
            "total": time.time() - t0,
        },
        "threads": args.threads,
        "torch": torch.__version__,
    }
    if args.circuit == "ov":
        target = pca.reconstruct(K=head_k).to(model.W_U.device)
        change = qs.evaluation.head_outputs.head_output_change(
            model,
            eval_toks,
            lambda: qs.inject_ov(model, target),
            batch_size=args.batch_size,
            progress=progress,
        )
        result["ov_output_change"] = {
            "K": head_k,
            "z": change["z"].tolist(),
            "write": change["write"].tolist(),
        }
        print(
            f"OV K={head_k}: relative change of head outputs z: median {np.median(change['z']):.3f}, "
            f"max {np.max(change['z']):.3f}"
        )
    (out / "importance.json").write_text(json.dumps(_jsonable(result), indent=1))
    print(f"wrote {out / 'importance.json'} ({time.time() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
