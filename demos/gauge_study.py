"""Gauge study, null baselines and per-layer PCA on one model (offline on the embedded model by default).

    python demos/gauge_study.py                                   # embedded stories260K on its own samples
    python demos/gauge_study.py --model DIR --text-file FILE      # any local checkpoint and text
    python demos/gauge_study.py --model gpt2                      # GPT-2 small by name (needs the hub)

Options are named as in ``qk-subspace run`` (``--model``, ``--text-file``, ``--ctx``, lists such as
``--ks 0 1 3`` or ``--ks 0,1,3``).

Writes to --out (default results/gauge_study): gauge.{html,png}, baselines_{raw,circuit}.{html,png},
layerwise_{raw,circuit}.{html,png}, one JSON per section (gauge_study.json: config, baselines, spread,
full table; canonical_sweep.json; baselines.json; layerwise.json) and CSVs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import qk_subspace as qs
from qk_subspace.cli import flat_ints, int_list
from qk_subspace.experiment.inputs import load_tokens
from qk_subspace.viz import save_figure

#: The QK representation of each PCA space.
REPRESENTATION = {"raw": "qk", "canonical": "qk-canonical", "circuit": "qk-circuit"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="stories260K", help="stories260K (embedded), a local HF dir or a TL name"
    )
    ap.add_argument(
        "--text-file", default=None, help="text to evaluate on (default: the embedded model's samples)"
    )
    ap.add_argument("--n-chunks", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument(
        "--ks", nargs="+", type=int_list("--ks"), default=[[0, 1, 3, 5, 10, 15, 20, 25, 30, 35, 40]]
    )
    ap.add_argument(
        "--ks-layer", nargs="+", type=int_list("--ks-layer"), default=None, help="per-layer K grid"
    )
    ap.add_argument("--n-gauges", type=int, default=3)
    ap.add_argument("--cond", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--random-seeds", type=int, default=3, help="random-subspace baseline seeds (0: skip)")
    ap.add_argument("--ks-random", nargs="+", type=int_list("--ks-random"), default=[[1, 3, 5, 10, 20, 30]])
    ap.add_argument("--no-layerwise", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="results/gauge_study")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--sections",
        default="gauge,canonical,baselines,layerwise",
        help="comma-separated subset of gauge,canonical,baselines,layerwise",
    )
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    t0 = time.time()
    model = qs.load_model(args.model)
    text = args.text_file or "the model's own samples"
    tokens = load_tokens(model, args.text_file, args.n_chunks * args.ctx, args.ctx)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    ks = [k for k in flat_ints(args.ks) or [] if k <= n_heads]
    timings: dict[str, float] = {"load": time.time() - t0}
    result: dict[str, object] = {"model": args.model, "text": text, "tokens": list(tokens.shape)}

    sections = set(args.sections.split(","))
    unknown = sections - {"gauge", "canonical", "baselines", "layerwise"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}")
    base = qs.perplexity(model, tokens, batch_size=args.batch_size, progress=False)
    result["baseline_ppl"] = base.ppl
    pd.set_option("display.width", 160)

    def dump(name: str, payload: object) -> None:
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))

    real: dict[str, pd.DataFrame] = {}
    if "gauge" in sections:
        t = time.time()
        study = qs.gauge_study(
            model,
            tokens,
            ks,
            n_gauges=args.n_gauges,
            cond=args.cond,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=progress,
        )
        timings["gauge_study"] = time.time() - t
        title = f"Gauge dependence of the QK PCA ({Path(args.model).name}, {tokens.shape[0]}x{tokens.shape[1]} tokens)"
        save_figure(qs.viz.gauge.gauge_figure(study, title=title), out, "gauge")
        study.table.to_csv(out / "gauge_table.csv", index=False)
        dump("gauge_study", {**result, **study.summary(), "timings_s": timings})
        real = {
            sp: study.table[(study.table.gauge == 0) & (study.table.space == sp)] for sp in ("raw", "circuit")
        }
        piv = study.table.pivot_table(index="K", columns=["space", "gauge"], values="ratio")
        print("\nPPL ratio vs K (columns: space, gauge; gauge 0 = as loaded)\n", piv.round(3).to_string())
        print(
            f"baseline max rel change under gauges: {study.baseline_max_rel_change:.2e} (ok={study.baseline_ok})"
        )

    if "canonical" in sections:
        t = time.time()
        canon = qs.sweep(
            model,
            tokens,
            ks,
            representation="qk-canonical",
            baseline=base,
            batch_size=args.batch_size,
            progress=progress,
        )
        timings["canonical_sweep"] = time.time() - t
        canon.to_csv(out / "canonical_sweep.csv", index=False)
        dump("canonical_sweep", {**result, "table": canon.to_dict(orient="records")})
        print("\ncanonical:", canon.set_index("K")["ratio"].round(3).to_dict())

    if "baselines" in sections and args.random_seeds > 0:
        ks_rand = [k for k in flat_ints(args.ks_random) or [] if k < n_heads - 1]
        payload: dict[str, object] = dict(result)
        for sp in ("raw", "circuit"):
            t = time.time()
            real_sp = real.get(sp)
            if real_sp is None:  # the real PCA's curve on the same K grid (gauge section not run)
                real_sp = qs.sweep(
                    model,
                    tokens,
                    [0, *ks_rand],
                    representation=REPRESENTATION[sp],
                    baseline=base,
                    batch_size=args.batch_size,
                    progress=progress,
                )
            nulls = qs.decomposition.nulls.spectrum_nulls(model, REPRESENTATION[sp], n_seeds=5, seed=0)
            rand = qs.evaluation.sweeps.random_subspace_sweep(
                model,
                tokens,
                ks_rand,
                representation=REPRESENTATION[sp],
                n_seeds=args.random_seeds,
                baseline=base,
                batch_size=args.batch_size,
                progress=progress,
            )
            timings[f"baselines_{sp}"] = time.time() - t
            fig = qs.viz.nulls.baselines_figure(
                nulls, real_sp, rand, title=f"{sp} space: real PCA vs null baselines"
            )
            save_figure(fig, out, f"baselines_{sp}")
            rand.to_csv(out / f"random_subspace_{sp}.csv", index=False)
            summ = qs.decomposition.nulls.summarize_random(rand)
            payload[sp] = {
                "real": real_sp[["K", "cumulative_variance", "ratio"]].to_dict(orient="records"),
                "spectrum_nulls": nulls.to_dict(orient="records"),
                "random_subspace": rand.to_dict(orient="records"),
                "random_subspace_summary": summ.to_dict(orient="records"),
            }
            print(f"\n{sp}: real", real_sp.set_index("K")["ratio"].round(3).to_dict())
            print(f"{sp}: random subspace\n", summ.round(3).to_string(index=False))
        dump("baselines", {**payload, "timings_s": timings})

    if "layerwise" in sections:
        ks_layer = flat_ints(args.ks_layer) if args.ks_layer else list(range(model.cfg.n_heads))
        payload = dict(result)
        for sp in ("raw", "circuit"):
            t = time.time()
            lw = qs.evaluation.sweeps.compare_layerwise_global(
                model,
                tokens,
                ks_layer,
                representation=REPRESENTATION[sp],
                baseline=base,
                batch_size=args.batch_size,
                progress=progress,
            )
            timings[f"layerwise_{sp}"] = time.time() - t
            title = f"{sp} space: per-layer vs global PCA at equal parameter count"
            save_figure(qs.viz.layerwise.layerwise_figure(lw, title=title), out, f"layerwise_{sp}")
            lw.to_csv(out / f"layerwise_{sp}.csv", index=False)
            payload[sp] = lw.to_dict(orient="records")
            cols = ["groupby", "K_layer", "K", "n_params", "global_variance", "ratio", "max_residual"]
            print(f"\n{sp} per layer vs global\n", lw[cols].round(4).to_string(index=False))
        dump("layerwise", {**payload, "timings_s": timings})

    timings["total"] = time.time() - t0
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
    print("wrote", out)


if __name__ == "__main__":
    main()
