"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qk_subspace as qs

SHARED_DATA = ROOT.parent / "shared" / "data"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
WIKITEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"

#: The seed report's grids: 6B (K) and 6C (k clusters), and its evaluation budget.
K_GRID = (1, 3, 10, 32, 64, 80, 100, 110, 120, 130, 140, 144)
CLUSTER_GRID = (4, 8, 12, 16, 32, 64)
CLUSTER_PCA_DIMS = 20
REPORT_TOKENS = 199_680  # 195 x 1024


#: GPT-2 small's shape, in TransformerLens' config names.
GPT2_SMALL_SHAPE = dict(
    n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257
)


def gpt2_small_config(
    dtype: torch.dtype = torch.float32, device: str = "cpu", normalization_type: str = "LN"
) -> Any:
    """HookedTransformerConfig of GPT-2 small's shape (``"LNPre"``: as after ``fold_ln``)."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        **GPT2_SMALL_SHAPE,
        act_fn="gelu_new",
        normalization_type=normalization_type,
        dtype=dtype,
        device=device,
        seed=0,
    )


def gpt2_small_pair(seed: int = 0) -> tuple[Any, Any]:
    """A random GPT-2-small ``GPT2LMHeadModel`` (sdpa) and the HookedTransformer with its weights.

    The HF model is initialised first (HF's GPT-2 init, so LN weights are 1 and biases 0 except
    as initialised) and converted with TransformerLens' own ``convert_gpt2_weights`` and no weight
    processing, so both hold the same weights by construction.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    g = GPT2_SMALL_SHAPE
    hf_cfg = GPT2Config(
        n_layer=g["n_layers"], n_embd=g["d_model"], n_head=g["n_heads"], n_positions=g["n_ctx"], n_ctx=g["n_ctx"],
        vocab_size=g["d_vocab"], activation_function="gelu_new",
    )  # fmt: skip
    hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").eval()
    cfg = gpt2_small_config()
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return hf, tl.eval()


def local_pair(path: str) -> tuple[Any, Any]:
    """``(HF AutoModelForCausalLM with sdpa, HookedTransformer)`` of a local checkpoint.

    No TransformerLens weight processing, so both hold the same weights.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
    tl = qs.load_model(
        path, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return hf, tl


def eval_tokens(
    tokenizer: Any, ctx: int, d_vocab: int, n_tokens: int = 200_000, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """WikiText-2 test tokens ``[n, ctx]`` (the report's protocol), or random tokens if the data is absent."""
    if tokenizer is not None and WIKITEXT.is_file():
        return qs.load_wikitext2(tokenizer, n_tokens=n_tokens, ctx=ctx, text_file=WIKITEXT), "WikiText-2 test"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (n_tokens // ctx, ctx), generator=g), "random tokens (WikiText-2 absent)"


def gpt2_tokenizer() -> Any:
    if not GPT2_TOKENIZER.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER), local_files_only=True)


def cluster_targets(
    W: torch.Tensor, pca: qs.HeadPCA, k: int, seed: int = 0, n_dims: int = CLUSTER_PCA_DIMS
) -> torch.Tensor:
    """The report's 6C target: k-means (sklearn) on the top ``n_dims`` PCA coefficients of the heads;
    every head is replaced by its cluster's representative (the member closest to the centroid).

    (A stand-in for ``qk_subspace.clustering``, written on another branch.)

    Returns a tensor shaped like ``W`` ``[n_layers, n_heads, d, d]``.
    """
    from sklearn.cluster import KMeans

    coords = pca.coefficients_[:, : min(n_dims, pca.n_components_)]
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(coords)
    flat = W.reshape(-1, *W.shape[-2:])
    out = flat.clone()
    for c in range(k):
        members = np.nonzero(km.labels_ == c)[0]
        rep = members[np.argmin(((coords[members] - km.cluster_centers_[c]) ** 2).sum(1))]
        out[members] = flat[rep]
    return out.reshape(W.shape)


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{mem}, torch threads {torch.get_num_threads()}"


def versions() -> str:
    from importlib.metadata import version

    import transformers

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, "
        f"transformer-lens {version('transformer-lens')}, scikit-learn {version('scikit-learn')}, "
        f"qk_subspace {qs.__version__} @ {commit}"
    )


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def append_to_section(path: Path, heading: str, intro: str, block: str) -> None:
    """Append ``block`` at the end of the ``heading`` section of the markdown file ``path``
    (creating the file/section if needed), before the next ``## `` section."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if heading not in text:
        text = text.rstrip() + f"\n\n{heading}\n\n{intro}\n"
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt
    text = text[:end].rstrip() + "\n\n" + block.strip() + "\n" + text[end:]
    path.write_text(text.rstrip() + "\n")
    print(f"\nappended to {path} under {heading!r}")


def publish(lines: list[str], no_append: bool, heading: str, intro: str) -> str:
    """Print the benchmark's markdown block and, unless ``no_append``, append it to ``RESULTS.md``'s ``heading``."""
    block = "\n".join(lines)
    print(block)
    if not no_append:
        append_to_section(Path(__file__).resolve().parent / "RESULTS.md", heading, intro, block)
    return block
