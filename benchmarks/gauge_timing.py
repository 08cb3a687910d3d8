"""Timing of the gauge tools and circuit-space PCA on a GPT-2-small-shaped random model.

    python benchmarks/gauge_timing.py [--n-chunks 2 --ctx 128] [--materialize]

12 layers x 12 heads, d_model 768, d_head 64, vocab 50257 (random weights: timings only, no
numbers about GPT-2 itself). Prints a JSON line per step and writes --out (default
results/gauge_timing.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import gpt2_small_config
from transformer_lens import HookedTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qk_subspace as qs
from qk_subspace.edits.circuit import circuit_injection_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-chunks", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--materialize", action="store_true", help="also time the materialised Gram (~680 MB)")
    ap.add_argument("--out", default="results/gauge_timing.json")
    args = ap.parse_args()

    cfg = gpt2_small_config()
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(
        0, cfg.d_vocab, (args.n_chunks, args.ctx), generator=torch.Generator().manual_seed(0)
    )
    res: dict[str, object] = {
        "torch_threads": torch.get_num_threads(),
        "tokens": [args.n_chunks, args.ctx],
    }

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = fn()
        res[name] = round(time.perf_counter() - t, 3)
        print(json.dumps({name: res[name]}), flush=True)
        return out

    base = timed("perplexity", lambda: qs.perplexity(model, tokens, progress=False))

    def gauge_roundtrip() -> float:
        with torch.no_grad(), qs.random_gauge(model, seed=1):
            pass
        return 0.0

    timed("random_gauge_enter_exit", gauge_roundtrip)

    def canon_roundtrip() -> None:
        with qs.canonical_gauge(model):
            pass

    timed("canonical_gauge_enter_exit", canon_roundtrip)
    timed("raw_pca_fit", lambda: qs.HeadPCA().fit(qs.qk_matrices(model)))
    circuit = qs.representations.get("qk-circuit")
    cpca = timed("circuit_pca_fit_gram_trick", lambda: qs.HeadPCA().fit(circuit.heads(model)))
    if args.materialize:
        W_Q, W_K = cpca.heads_.W_Q, cpca.heads_.W_K
        heads = qs.representations.CircuitHeads(W_Q, W_K, materialize=True)
        c2 = timed("circuit_pca_fit_materialized", lambda: qs.HeadPCA().fit(heads))
        res["gram_trick_vs_materialized_max_rel"] = float(
            abs(c2.explained_variance_ - cpca.explained_variance_).max() / cpca.explained_variance_[0]
        )
    h = cpca.heads_
    timed(
        "circuit_injection_weights_K10",
        lambda: circuit_injection_weights(h.W_Q, h.W_K, h.gram(), cpca.mixing(K=10).matrix()),
    )
    timed("layerwise_pca_fit", lambda: qs.HeadPCA(groupby="layer").fit(qs.qk_matrices(model)))
    timed("spectrum_nulls_raw_5seeds", lambda: qs.decomposition.nulls.spectrum_nulls(model, "qk", n_seeds=5))
    st = timed(
        "gauge_study_ks3_1gauge",
        lambda: qs.gauge_study(model, tokens, [0, 10, 143], n_gauges=1, progress=False, n_boot=200),
    )
    res["gauge_study_baseline_max_rel_change"] = st.baseline_max_rel_change
    res["gauge_study_k_all_circuit_ratio"] = float(
        st.table[(st.table.space == "circuit") & (st.table.K == 143)]["ratio"].max()
    )
    res["baseline_ppl"] = base.ppl
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
