"""The whole experiment fully offline on the real pretrained Llama-style model stories260K.

Uses ../shared/data/models/stories260K (5 layers x 8 query heads = 40 heads, grouped-query attention
with 4 key/value heads, rotary) and TinyStories validation text, 32,768 tokens in 128 chunks of 256.
Equivalent CLI:

    qk-subspace run --model ../shared/data/models/stories260K \\
        --text-file ../shared/data/tinystories/tinystories_val.txt --n-tokens 32768 --ctx 256 --out results/stories260K
"""

from __future__ import annotations

import argparse
from pathlib import Path

import qk_subspace as qs
from qk_subspace.report import format_tables

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/stories260K")
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared data directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-png", action="store_true")
    args = p.parse_args()
    model_dir = args.shared / "models" / "stories260K"
    text = args.shared / "tinystories" / "tinystories_val.txt"
    if not model_dir.is_dir() or not text.is_file():
        raise SystemExit(f"needs {model_dir} and {text} (the ../shared data beside the repository)")
    res = qs.run_experiment(
        model_dir,
        args.out,
        text_file=str(text),
        n_tokens=32_768,
        ctx=256,
        resume=args.resume,
        png=not args.no_png,
    )
    print(format_tables(res.results))
    print(f"results: {res.path}\nreport: {res.report_path}")


if __name__ == "__main__":
    main()
