"""Command line: ``qk-subspace run --model NAME_OR_LOCAL_DIR [options]``.

Extending: add a field to :class:`qk_subspace.experiment.ExperimentConfig` and an argument with the
same ``dest`` in :func:`add_run_arguments` (or in a new subcommand's own function registered in
:func:`build_parser`); :func:`config_from_args` copies every argument whose name is a config field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["add_run_arguments", "build_parser", "config_from_args", "main"]


def _int_list(values: Sequence[str] | None, flag: str = "--ks") -> tuple[int, ...] | None:
    """``["1,3", "10"]`` -> ``(1, 3, 10)``."""
    if values is None:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(f"{flag} expects integers (e.g. 1,3,10), got {part!r}") from None
    return tuple(out)


def _n_tokens(value: str) -> int | None:
    if value.lower() in ("all", "none"):
        return None
    try:
        return int(value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n-tokens must be an integer or 'all', got {value!r}") from None


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The ``run`` subcommand's arguments (``dest`` = ExperimentConfig field name)."""
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        metavar="NAME_OR_DIR",
        help="official TransformerLens name (gpt2, needs the hub) or local HF checkpoint dir; "
        "several models run in order behind the gate (e.g. --model gpt2 gpt2-medium)",
    )
    p.add_argument("--out", default="results", help="output directory (default: results)")
    g = p.add_argument_group("evaluation text")
    g.add_argument(
        "--text-file",
        dest="text_file",
        default=None,
        help="local text: a wiki.*.raw file gives the WikiText-2 protocol, anything else is chunked "
        "as plain text (default: WikiText-2 test via `datasets`)",
    )
    g.add_argument("--text-format", dest="text_format", choices=("auto", "wikitext", "plain"), default="auto")
    g.add_argument(
        "--n-tokens",
        dest="n_tokens",
        type=_n_tokens,
        default=200_000,
        help="first N tokens of the stream ('all' for everything; default 200000 = 195 x 1024)",
    )
    g.add_argument("--ctx", type=int, default=None, help="chunk length (default min(1024, model n_ctx))")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    s = p.add_argument_group("sweeps")
    s.add_argument(
        "--ks",
        nargs="+",
        default=None,
        help="K grid, e.g. 1,3,10,144 (default: the report's grid scaled to the number of heads; "
        "K=all and the gate K are always added)",
    )
    s.add_argument(
        "--cluster-ks",
        dest="cluster_ks",
        nargs="+",
        default=None,
        help="cluster counts k (default 4,8,12,16,32,64; k >= n_heads dropped)",
    )
    s.add_argument(
        "--n-dims", dest="n_dims", type=int, default=20, help="PCA coordinates for k-means (default 20)"
    )
    s.add_argument("--map-k", dest="map_k", type=int, default=None, help="k that colours the 2D map")
    s.add_argument("--seed", type=int, default=0, help="k-means and bootstrap seed")
    s.add_argument("--n-boot", dest="n_boot", type=int, default=2000, help="bootstrap resamples for the CIs")
    s.add_argument("--gate-k", dest="gate_k", type=int, default=10)
    s.add_argument("--gate-threshold", dest="gate_threshold", type=float, default=1.1)
    c = p.add_argument_group("circuit, component order, diagnostics")
    c.add_argument(
        "--circuit",
        choices=("qk", "ov"),
        default="qk",
        help="qk: W_QK edited through W_Q (default); ov: head-space OV circuits edited through W_V",
    )
    c.add_argument(
        "--order",
        choices=("variance", "importance"),
        default="variance",
        help="importance: also rank components (--importance-method) and sweep K over that order; "
        "writes the orderings and an overlay figure",
    )
    c.add_argument(
        "--importance-method",
        dest="importance_method",
        choices=("drop_one", "gradient"),
        default="drop_one",
        help="how --order importance ranks components (default drop_one)",
    )
    c.add_argument(
        "--importance-tokens",
        dest="importance_tokens",
        type=int,
        default=32_768,
        help="tokens for the ranking, taken from the text after the perplexity (and diagnostic) "
        "tokens (default 32768)",
    )
    c.add_argument(
        "--diagnostics",
        action="store_true",
        help="per-head attention-pattern metrics per K (attention_diagnostics) and their figures",
    )
    c.add_argument(
        "--diag-seqs", dest="diag_seqs", type=int, default=8, help="diagnostic batch sequences (default 8)"
    )
    c.add_argument(
        "--diag-ctx", dest="diag_ctx", type=int, default=128, help="diagnostic batch length (default 128)"
    )
    c.add_argument(
        "--no-head-scores",
        dest="head_scores",
        action="store_false",
        help="skip the previous-token/duplicate-token/induction scores in the diagnostics",
    )
    q = p.add_argument_group("PCA space, per-layer PCA, null baselines, gauges (QK only)")
    q.add_argument(
        "--space",
        choices=("raw", "canonical", "circuit"),
        default="raw",
        help="raw: PCA of W_Q^T W_K (the report, default); canonical: the same in the canonical gauge; "
        "circuit: gauge-invariant PCA of C_h = W_Q W_K^T, injected through W_Q (residual recorded)",
    )
    q.add_argument(
        "--groupby",
        choices=("layer",),
        default=None,
        help="layer: also one PCA per layer (K per layer, clipped to heads per layer) compared with "
        "the global PCA at equal parameter count (layerwise section and figure)",
    )
    q.add_argument(
        "--baselines",
        action="store_true",
        help="null baselines: spectrum nulls (shuffled / Gaussian heads, Marchenko-Pastur) and random "
        "K-dim subspaces (perplexity), in the JSON, a figure and the report",
    )
    q.add_argument(
        "--baseline-seeds",
        dest="baseline_seeds",
        type=int,
        default=3,
        help="seeds of the null models and random subspaces per K (default 3)",
    )
    q.add_argument(
        "--gauges",
        type=int,
        default=0,
        metavar="N",
        help="N > 0: gauge study, raw and circuit curves under N random gauges "
        "((N+1) x (1 + 2 x len(K grid)) evaluations)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="cpu, cuda, ... (default: TransformerLens' choice)")
    r.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out, skipping finished points (refuses a different configuration)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace existing results of the same model")
    r.add_argument("--no-png", dest="png", action="store_false", help="write HTML figures only")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> Any:
    """An :class:`ExperimentConfig` from parsed arguments (every argument named like a field)."""
    from .experiment import ExperimentConfig

    values = dict(vars(args))
    values["ks"] = _int_list(values.get("ks"))
    cks = _int_list(values.get("cluster_ks"), "--cluster-ks")
    values["cluster_ks"] = cks if cks is not None else ExperimentConfig.cluster_ks
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return ExperimentConfig(**{k: v for k, v in values.items() if k in names})


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiment import run_models
    from .report import format_tables

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    done, skipped = run_models(args.model, args.out, cfg)
    wall = time.perf_counter() - t0
    for res in done:
        print()
        print(format_tables(res.results))
        print(f"results: {res.path}")
    for name, reason in skipped:
        print(f"\nskipped {name}: {reason}")
    if done and done[0].report_path is not None:
        print(f"report: {done[0].report_path}")
    print(f"wall time: {wall:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qk-subspace",
        description="Do attention heads share a low-dimensional QK subspace? PCA, exact injection, perplexity.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the full experiment (6A/6B/6C, 2D map, gate) for one or more models")
    add_run_arguments(run)
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qk-subspace``; returns the exit status (2 on a user error, with a message)."""
    from .results import ConfigMismatchError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (
        ConfigMismatchError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
        ConnectionError,
        ValueError,
        TypeError,
    ) as exc:
        if os.environ.get("QK_SUBSPACE_DEBUG"):
            raise
        print(f"qk-subspace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
