"""Induction heads under compression: raw W_Q^T W_K PCA vs the gauge-invariant circuit PCA on induction-2l.

induction-2l is a real trained 2-layer attention-only model (4 heads per layer, no rotary) whose layer-1
heads do induction: on a random block repeated, they attend from each token to the token after its
previous occurrence, and the loss on the repeats falls far below the first block's. This demo rebuilds the
heads from K components in each representation and measures, per K:

* the induction score of every layer-1 head (mean attention from query i to key i - block + 1 on the
  repeats) and the loss on the repeated blocks;
* side by side, the attention pattern of the strongest induction head, originally and at the K where the
  raw reconstruction breaks it (its induction score below half the original), for both representations.

Run (needs ../shared beside the repository, or pass the model directory):

    python demos/induction_heads.py [MODEL_DIR] [--out induction_out] [--no-png]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import qk_subspace as qs
from qk_subspace.experiment.compare_config import CompareConfig
from qk_subspace.experiment.compare_run import compare_tokens
from qk_subspace.viz import save_figure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "data" / "models" / "induction-2l"
BLOCK = 16
SPACES = {"raw": "qk", "invariant": "qk-circuit"}


def repeated_tokens(model: Any, n_seqs: int = 64, block: int = BLOCK) -> torch.Tensor:
    """``[n_seqs, n_ctx]``: a random ``block``-token block per sequence, repeated (seed 0)."""
    cfg = CompareConfig().replace(tokens="repeated", block=block, n_seqs=n_seqs)
    return compare_tokens(model, cfg)[0]


def measure(model: Any, tokens: torch.Tensor, layer: int, block: int = BLOCK) -> dict[str, Any]:
    """Induction score per head of ``layer`` ``[n_heads]``, loss on the first block and on the repeats,
    and the layer's patterns of the first sequence ``[n_heads, pos, pos]``."""
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    pattern = cache[name].double()  # [b, h, q, k]
    q = torch.arange(block, tokens.shape[1])
    score = pattern[:, :, q, q - block + 1].mean(dim=(0, 2))
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [b, pos-1]: predicting token t+1
    return {
        "induction_score": score.numpy(),
        "loss_first_block": float(nll[:, : block - 1].mean()),
        "loss_repeats": float(nll[:, block - 1 :].mean()),
        "pattern": pattern[0].numpy(),
    }


def sweep(model: Any, tokens: torch.Tensor, ks: list[int], layer: int = 1) -> tuple[pd.DataFrame, dict]:
    """Rows per (space, K) and the patterns ``{(space, K): [n_heads, pos, pos]}``."""
    rows, patterns = [], {}
    base = measure(model, tokens, layer)
    patterns[("original", -1)] = base["pattern"]
    for space, name in SPACES.items():
        rep = qs.representations.get(name)
        pca = qs.HeadPCA().fit(rep.heads(model))
        for K in ks:
            with rep.edit(model, pca.heads_, pca.mixing(K=K)) as edit:
                m = measure(model, tokens, layer)
            patterns[(space, K)] = m["pattern"]
            row = {
                "space": space,
                "K": K,
                "loss_repeats": m["loss_repeats"],
                "loss_first_block": m["loss_first_block"],
            }
            row.update({f"induction_L{layer}H{h}": float(s) for h, s in enumerate(m["induction_score"])})
            row["residual_total"] = float(edit.residual_total)
            rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs.update(baseline=base, layer=layer)
    return df, patterns


def breaking_k(df: pd.DataFrame, head: str, original: float, space: str = "raw") -> int:
    """The largest K at which ``head``'s induction score in ``space`` is below half its original."""
    sub = df[(df["space"] == space) & (df[head] < 0.5 * original)]
    return int(sub["K"].max()) if len(sub) else int(df["K"].min())


def figure(df: pd.DataFrame, patterns: dict, head: int, k_break: int, block: int = BLOCK) -> Any:
    """Induction scores and repeat loss vs K (top), the head's patterns: original, raw and invariant at
    ``k_break`` (bottom; first ``3 * block`` positions of one sequence)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layer = df.attrs["layer"]
    base = df.attrs["baseline"]
    fig = make_subplots(
        rows=2, cols=3, row_heights=[0.45, 0.55], vertical_spacing=0.14,
        specs=[[{"colspan": 2}, None, {}], [{}, {}, {}]],
        subplot_titles=(
            f"induction score of the layer-{layer} heads vs K (dashed: raw, solid: invariant)",
            "loss on the repeats (nats)",
            f"L{layer}H{head} original", f"raw, K={k_break}", f"invariant, K={k_break}",
        ),
    )  # fmt: skip
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    heads = [c for c in df.columns if c.startswith("induction_")]
    for i, c in enumerate(heads):
        for space, dash in (("raw", "dash"), ("invariant", "solid")):
            sub = df[df["space"] == space]
            fig.add_trace(
                go.Scatter(
                    x=sub["K"], y=sub[c], mode="lines+markers", line=dict(color=colors[i % 8], dash=dash),
                    name=f"{c.removeprefix('induction_')} {space}", legendgroup=c,
                ),
                row=1, col=1,
            )  # fmt: skip
    for space, color in (("raw", "#d62728"), ("invariant", "#1f77b4")):
        sub = df[df["space"] == space]
        fig.add_trace(
            go.Scatter(x=sub["K"], y=sub["loss_repeats"], mode="lines+markers", line=dict(color=color), name=f"loss, {space}"),
            row=1, col=3,
        )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=[df["K"].min(), df["K"].max()], y=[base["loss_repeats"]] * 2, mode="lines",
            line=dict(dash="dot", color="grey"), name="loss, original",
        ),
        row=1, col=3,
    )  # fmt: skip
    n = min(3 * block, patterns[("original", -1)].shape[-1])
    for c_i, key in enumerate((("original", -1), ("raw", k_break), ("invariant", k_break)), start=1):
        fig.add_trace(
            go.Heatmap(
                z=patterns[key][head, :n, :n], colorscale="Blues", zmin=0, zmax=1, showscale=c_i == 3,
                colorbar=dict(len=0.5, y=0.25, title="attention"),
            ),
            row=2, col=c_i,
        )  # fmt: skip
        fig.update_yaxes(autorange="reversed", title_text="query", row=2, col=c_i)
        fig.update_xaxes(title_text="key", row=2, col=c_i)
    fig.update_xaxes(title_text="K (components kept)", row=1, col=1)
    fig.update_xaxes(title_text="K", row=1, col=3)
    fig.update_layout(
        title=f"induction-2l: what breaks first, raw vs invariant (original score of L{layer}H{head}: "
        f"{float(df.attrs['baseline']['induction_score'][head]):.3f})",
        template="plotly_white", width=1300, height=900,
    )  # fmt: skip
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="induction-2l directory")
    p.add_argument("--out", default="induction_out")
    p.add_argument("--no-png", dest="png", action="store_false")
    args = p.parse_args(argv)
    if not Path(args.model).is_dir():
        raise SystemExit(
            f"{args.model} does not exist: pass the induction-2l directory (see ../shared/README.md)"
        )
    torch.manual_seed(0)
    model = qs.load_model(args.model)
    tokens = repeated_tokens(model)
    n = model.cfg.n_layers * model.cfg.n_heads
    df, patterns = sweep(model, tokens, list(range(n + 1)))
    base = df.attrs["baseline"]
    layer = df.attrs["layer"]
    head = int(np.argmax(base["induction_score"]))
    col = f"induction_L{layer}H{head}"
    k_break = breaking_k(df, col, float(base["induction_score"][head]))
    print(f"loss: first block {base['loss_first_block']:.2f} nats, repeats {base['loss_repeats']:.2f} nats")
    print(f"induction scores of layer {layer}: {np.round(base['induction_score'], 3).tolist()}")
    print(df.drop(columns=["loss_first_block"]).round(3).to_string(index=False))
    print(
        f"L{layer}H{head} (strongest induction head): raw breaks it (score < half) at K={k_break}; ", end=""
    )
    inv = df[(df["space"] == "invariant") & (df["K"] == k_break)][col].iloc[0]
    print(f"invariant at that K keeps {inv:.3f} (original {base['induction_score'][head]:.3f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "induction_sweep.csv", index=False)
    files = save_figure(figure(df, patterns, head, k_break), out, "induction_heads", png=args.png)
    print("written:", out / "induction_sweep.csv", *files.values())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
