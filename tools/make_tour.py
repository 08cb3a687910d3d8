"""Regenerate demos/tour.ipynb (outputs cleared). Run: python tools/make_tour.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat as nbf

cells: list[tuple[str, str]] = [
    (
        "md",
        """# qk_subspace: a notebook tour

Do the attention heads of a transformer share a low-dimensional weight subspace, and what breaks when you
force them into it? This tour runs **fully offline, from any folder**, on the real pretrained Llama-style
model `stories260K` embedded in the package (5 layers x 8 query heads, grouped-query attention, rotary),
on text the model sampled itself, on a CPU in about a minute. It needs only `pip install -e ".[dev]"`.

**Another model**: set `MODEL` to a local Hugging Face checkpoint directory (and `TEXT` to a text file),
or to `"gpt2"` with internet (then `TEXT = None` uses WikiText-2 via `datasets`).""",
    ),
    (
        "code",
        """import os
from pathlib import Path

import plotly.io as pio
import torch

import qk_subspace as qs
from qk_subspace.experiment.inputs import load_tokens
from qk_subspace.viz import png_export_available

torch.set_num_threads(min(2, os.cpu_count() or 1))
# interactive figures, plus a static PNG copy that plain notebook viewers show (needs a Chromium)
pio.renderers.default = "plotly_mimetype+png" if png_export_available() else "plotly_mimetype+notebook"
MODEL = "stories260K"  # embedded in the package; or a local checkpoint dir, or "gpt2" with internet
TEXT = None  # None: the embedded model's own samples; or a path to a text file
OUT = Path(os.environ.get("QK_SUBSPACE_TOUR_OUT", "tour_out"))
print(qs.__version__)""",
    ),
    (
        "md",
        """## 1. Load the model (no network access at all for the embedded model or a local checkpoint)""",
    ),
    (
        "code",
        """model = qs.load_model(MODEL)
print(model.cfg.n_layers, "layers x", model.cfg.n_heads, "heads; key/value heads:", model.cfg.n_key_value_heads)
print("processing:", model.qk_subspace_processing)
tokens = load_tokens(model, TEXT, n_tokens=16 * 256, ctx=256)  # [16, 256], as qk-subspace run cuts them
tokens.shape""",
    ),
    (
        "md",
        """## 2. QK circuits and PCA across heads

`qs.qk_matrices` reads TransformerLens' factored circuit `model.QK`:
`W[l, h] = W_Q[l, h]^T W_K[l, h]`, shape `[n_layers, n_heads, d_head, d_head]`, float64.""",
    ),
    (
        "code",
        """W = qs.qk_matrices(model)
pca = qs.HeadPCA().fit(W)
print(W.shape, pca)
print({f"{t:.0%}": pca.n_components_for(t) for t in (0.5, 0.8, 0.9, 0.95)})
variance = qs.experiment.variance_summary(pca)
qs.viz.variance.fig_cumvar({"variance": variance, "metadata": {"model": "stories260K"}})""",
    ),
    (
        "md",
        """## 3. Exact injection, and the K = all check

`qs.inject_qk` edits `W_Q` in place so that `W_Q_new^T W_K` equals the target, keeps the part of `W_Q`
outside `span(W_K)`, and restores the original weights bit for bit when the block ends. With every
component kept the model must be unchanged; the pseudoinverse solution is shown for contrast.""",
    ),
    (
        "code",
        """baseline = qs.perplexity(model, tokens, progress=False)
with qs.inject_qk(model, pca.reconstruct(pca.n_heads_)) as edit:
    k_all = qs.perplexity(model, tokens, progress=False)
with qs.inject_qk(model, pca.reconstruct(pca.n_heads_), method="pinv"):
    pinv = qs.perplexity(model, tokens, progress=False)
print(f"baseline {baseline.ppl:.5f}   K=all {k_all.ppl:.5f}   (ratio {k_all.ppl / baseline.ppl:.8f}, "
      f"max relative residual {edit.residual.max():.2e})   pinv {pinv.ppl:.3f}")
assert abs(k_all.ppl / baseline.ppl - 1) < 1e-5""",
    ),
    (
        "md",
        """## 4. A small K sweep (the report's 6B), clustering (6C) and the 2D map

`qs.sweep_k` injects the top-K reconstruction for every K and measures perplexity with a paired bootstrap
CI over chunks. `qs.run_experiment` composes everything (variance, sweep, clustering, map, gate) and writes
JSON, figures and `report.md`; its figures are plotly objects for notebooks.""",
    ),
    (
        "code",
        """sweep = qs.sweep_k(model, pca, tokens, [0, 3, 10, 20, 40], baseline=baseline, progress=False)
sweep[["K", "cumulative_variance", "ppl", "ratio", "ratio_low", "ratio_high"]]""",
    ),
    (
        "code",
        """res = qs.run_experiment(model, OUT, tokens=tokens, ks=(0, 3, 10, 20, 40), cluster_ks=(4, 8),
                        png=False, progress=False, overwrite=True)
res.figures["exp6b_ppl_vs_K_stories260K"]""",
    ),
    (
        "code",
        """clusters = qs.cluster_heads(pca, k=8, seed=0)
print("representatives:", clusters.representatives)
res.tables()["clustering"]""",
    ),
    ("code", """res.figures["exp6c_cluster_viz_stories260K"]"""),
    (
        "md",
        """## 5. Which heads break? Attention-pattern diagnostics in the same hooked model

The compressed circuit is injected into the one model, so perplexity and attention patterns come from the
same weights. KL(original || edited) per head, streamed layer by layer.""",
    ),
    (
        "code",
        """diag_tokens = tokens[:4, :128]
diag = qs.attention_diagnostics(model, diag_tokens, target=pca.reconstruct(10), head_scores=False)
worst = diag.sort_values("kl", ascending=False).head(3)
worst[["label", "kl", "js", "tv", "top1_agreement", "entropy_orig", "entropy_edited"]]""",
    ),
    (
        "code",
        """heads = [(int(r.layer), int(r.head)) for r in worst.itertuples()][:2]
seq = diag_tokens[0, :24]
pairs = qs.head_patterns(model, seq, heads, target=pca.reconstruct(10))
labels = [model.tokenizer.decode([int(t)]) for t in seq]
qs.viz.diagnostics.plot_pattern_comparison(pairs, labels)""",
    ),
    (
        "md",
        """## 6. Gauge: how much of the PCA is the heads' arbitrary internal basis?

`W_Q -> W_Q G`, `W_K -> W_K G^-T` leaves the model unchanged but changes `W_Q^T W_K`. The circuit-space PCA
of `W_Q W_K^T` is gauge-invariant.""",
    ),
    (
        "code",
        """raw_before = qs.HeadPCA().fit(qs.qk_matrices(model)).cumulative_variance_[9]
circuit = qs.representations.get("qk-circuit")   # W_Q W_K^T per head: gauge-invariant
circ_before = qs.HeadPCA().fit(circuit.heads(model)).cumulative_variance_[9]
with qs.random_gauge(model, seed=1):
    gauged = qs.perplexity(model, tokens, progress=False)
    raw_after = qs.HeadPCA().fit(qs.qk_matrices(model)).cumulative_variance_[9]
    circ_after = qs.HeadPCA().fit(circuit.heads(model)).cumulative_variance_[9]
print(f"ppl {baseline.ppl:.6f} -> {gauged.ppl:.6f}")
print(f"raw variance at K=10: {raw_before:.4f} -> {raw_after:.4f} (moves)")
print(f"circuit variance at K=10: {circ_before:.6f} -> {circ_after:.6f} (invariant)")""",
    ),
    (
        "md",
        """The curve, not just the variance: `qs.compare_spaces` runs the raw PCA under random gauges (a band),
the canonical gauge, the invariant circuit PCA (written into `W_Q` and `W_K` jointly, the best rank-`d_head`
factorisation; per rotary pair on this rotary model), random subspaces and the mean head, and puts them
against K and against stored values. `qk-subspace compare` does the same with a JSON, figure and report.""",
    ),
    (
        "code",
        """comp = qs.compare_spaces(model, tokens[:16], ks=[2, 10], gauges=2, seeds=1, progress=False, n_boot=100)
print(comp.paragraph())
comp.figure""",
    ),
    (
        "md",
        """## 7. A known circuit: induction heads under compression

`induction-2l` (in `../shared`, not shipped) is a real trained 2-layer attention-only model with induction
heads: on a random block repeated, layer-1 heads attend from each token to the token after its previous
occurrence. Score = that attention, averaged; compare raw and invariant reconstructions per K.
`demos/induction_heads.py` makes the full figure (scores, loss on the repeats, attention patterns side by side).""",
    ),
    (
        "code",
        """INDUCTION = Path(os.environ.get("QK_SUBSPACE_INDUCTION", "../shared/data/models/induction-2l"))
if INDUCTION.is_dir():
    ind = qs.load_model(INDUCTION)
    block = torch.randint(0, ind.cfg.d_vocab, (32, 16), generator=torch.Generator().manual_seed(0))
    rep_tokens = block.repeat(1, 6)[:, : ind.cfg.n_ctx]

    def induction_scores(m):  # layer-1 attention from query i to key i - 15 (after the previous copy)
        _, cache = m.run_with_cache(rep_tokens, names_filter="blocks.1.attn.hook_pattern")
        p, q = cache["blocks.1.attn.hook_pattern"], torch.arange(16, rep_tokens.shape[1])
        return p[:, :, q, q - 15].mean(dim=(0, 2)).numpy().round(3)

    print("original     ", induction_scores(ind))
    for name in ("qk", "qk-circuit"):
        rep = qs.representations.get(name)
        ipca = qs.HeadPCA().fit(rep.heads(ind))
        for K in (2, 4):
            with rep.edit(ind, ipca.heads_, ipca.mixing(K=K)):
                print(f"{name:10s} K={K}", induction_scores(ind))
else:
    print(f"{INDUCTION} not found: set QK_SUBSPACE_INDUCTION to the induction-2l directory")""",
    ),
    (
        "md",
        """## 8. Importance, not variance, and the OV circuit

A first-order (gradient) estimate ranks components by their effect on the loss; the same pipeline runs on
the OV circuit, injected exactly through `W_V`.""",
    ),
    (
        "code",
        """imp = qs.component_importance(model, pca, tokens[:8], method="gradient", progress=False)
imp.sort_values("fisher", ascending=False).head(5)[["component", "explained_variance_ratio", "taylor", "fisher"]]""",
    ),
    (
        "code",
        """W_ov = qs.ov_matrices(model)
pca_ov = qs.HeadPCA().fit(W_ov)
with qs.inject_ov(model, pca_ov.reconstruct(pca_ov.n_heads_)):
    ov_all = qs.perplexity(model, tokens, progress=False)
with qs.inject_ov(model, pca_ov.reconstruct(10)):
    ov_10 = qs.perplexity(model, tokens, progress=False)
print(f"OV: K=all ratio {ov_all.ppl / baseline.ppl:.8f}, K=10 ratio {ov_10.ppl / baseline.ppl:.3f}")""",
    ),
    (
        "md",
        """## Where next

- `qk-subspace run --model gpt2 --out results` reproduces the seed report (needs the hub).
- `--diagnostics`, `--order importance`, `--circuit ov`, `--space circuit`, `--baselines`: `docs/protocol.md`.
- Every public name: `docs/api.md`.""",
    ),
]

nb = nbf.v4.new_notebook()
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
nb.metadata["language_info"] = {"name": "python"}
nb.cells = [
    nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells
]
out = Path(__file__).resolve().parents[1] / "demos" / "tour.ipynb"
nbf.write(nb, out)
# the code cells follow the project's formatting (CI runs `ruff format --check` on the notebook too)
subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(out)], check=False)
print("wrote", out)
