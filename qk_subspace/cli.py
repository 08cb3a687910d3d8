"""Command line: ``qk-subspace run --model NAME_OR_LOCAL_DIR [options]`` and ``qk-subspace compare ...``.

The ``run`` options are generated from the fields of :class:`qk_subspace.experiment.config.ExperimentConfig`
(names, defaults, help, allowed values), so a new option is one field there; the ``compare`` options from
:class:`qk_subspace.experiment.compare_config.CompareConfig` the same way. Only argparse and the
torch-free config module are imported until a command actually runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .experiment.config import GROUPS, ExperimentConfig, Option, fields_of
from .model.embedded import EMBEDDED_NAME

__all__ = [
    "add_group_arguments",
    "add_run_arguments",
    "build_parser",
    "config_from_args",
    "flat_ints",
    "int_list",
    "main",
]


def int_list(flag: str) -> Any:
    """An argparse ``type`` for integer lists: ``1,3,10`` (several such words with ``nargs="+"``)."""

    def parse(value: str) -> list[int]:
        out = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{flag} expects integers (e.g. 1,3,10), got {part!r}"
                ) from None
        return out

    return parse


def _n_tokens(value: str) -> int | None:
    if value.lower() in ("all", "none"):
        return None
    try:
        return int(value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n-tokens must be an integer or 'all', got {value!r}") from None


def _argument(group: Any, name: str, opt: Option, default: Any) -> None:
    """One argparse argument for a config field (``dest`` = the field's name)."""
    flag = opt.flag_for(name, default)
    shown = "all" if opt.kind == "n_tokens" and default is None else default
    if isinstance(shown, tuple):
        shown = ",".join(map(str, shown))
    kw: dict[str, Any] = {"dest": name}
    if opt.kind == "bool":
        kw.update(action="store_false" if default is True else "store_true", help=opt.help)
    else:
        if shown is not None:
            kw["help"] = f"{opt.help} (default: {shown})"
        else:
            kw["help"] = opt.help if "default" in opt.help else f"{opt.help} (default: none)"
        kw["default"] = default
        if opt.choices is not None:
            kw["choices"] = opt.choices
        if opt.metavar is not None:
            kw["metavar"] = opt.metavar
        if opt.kind == "ints":
            kw.update(nargs="+", type=int_list(flag))
        elif opt.kind == "n_tokens":
            kw["type"] = _n_tokens
        elif opt.kind in ("int", "float"):
            kw["type"] = int if opt.kind == "int" else float
    group.add_argument(flag, **kw)


def add_group_arguments(p: argparse.ArgumentParser, groups: dict[str, type]) -> None:
    """One argument group per option group, one argument per field."""
    for cls in groups.values():
        group = p.add_argument_group((cls.__doc__ or cls.__name__).strip())
        for f, opt in fields_of(cls):
            _argument(group, f.name, opt, f.default)


def _model_argument(p: argparse.ArgumentParser, several: bool) -> None:
    what = (
        "an official TransformerLens name (gpt2, gpt2-medium, ...: needs the hub or its cache), a local Hugging "
        "Face checkpoint directory or a TransformerLens-native one (hooked_transformer_config.json + "
        "model.safetensors)"
    )
    if several:
        p.add_argument(
            "--model", nargs="+", default=None, metavar="NAME_OR_DIR",
            help=f"model(s): {EMBEDDED_NAME} (embedded in the package, offline), {what}; NAME@STEP is an official "
            "Pythia checkpoint by training step (pythia-70m@1000); several run in order behind the gate, e.g. "
            f"--model gpt2 gpt2-medium (default: {EMBEDDED_NAME})",
        )  # fmt: skip
        p.add_argument(
            "--models-file", default=None, metavar="PATH",
            help="a text file of models, one name or checkpoint directory per line (# comments), run after "
            "--model's (default: none)",
        )  # fmt: skip
    else:
        p.add_argument(
            "--model", default=EMBEDDED_NAME, metavar="NAME_OR_DIR",
            help=f"model: {EMBEDDED_NAME} (embedded in the package, offline), {what} (default: {EMBEDDED_NAME})",
        )  # fmt: skip
    p.add_argument("--out", default="results", help="output directory (default: results)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The ``run`` subcommand's arguments: ``--model``, ``--out`` and one per config field."""
    _model_argument(p, several=True)
    add_group_arguments(p, GROUPS)


def models_from_file(path: str) -> list[str]:
    """The models listed in ``path``: one per line; blank lines and ``#`` comments are skipped.

    A relative checkpoint directory is taken relative to the file's folder.
    """
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FileNotFoundError(f"--models-file {path!r}: {exc.strerror or exc}") from None
    out = []
    for line in lines:
        entry = line.split("#", 1)[0].strip()
        if entry:
            local = file.parent / entry
            out.append(str(local) if not Path(entry).is_absolute() and local.is_dir() else entry)
    if not out:
        raise ValueError(f"--models-file {path!r} lists no models")
    return out


def flat_ints(values: Sequence[Any] | None) -> list[int] | None:
    """The integers of ``nargs="+"`` arguments of :func:`int_list` (``None`` stays ``None``)."""
    if values is None:
        return None
    return [x for part in values for x in (part if isinstance(part, list) else [part])]


def groups_from_args(args: argparse.Namespace, groups: dict[str, type]) -> dict[str, Any]:
    """``{group: option group instance}`` from parsed arguments (every argument named like an option)."""
    values = vars(args)
    out = {}
    for g, cls in groups.items():
        kw = {}
        for f, opt in fields_of(cls):
            v = values[f.name]
            if opt.kind == "ints" and isinstance(v, list):  # nargs="+" of comma lists: flatten
                v = tuple(flat_ints(v) or ())
            kw[f.name] = v
        out[g] = cls(**kw)
    return out


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from parsed arguments."""
    return ExperimentConfig(**groups_from_args(args, GROUPS))


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiment.runner import run_models
    from .report import format_tables

    cfg = config_from_args(args)
    models = list(args.model or []) + (models_from_file(args.models_file) if args.models_file else [])
    t0 = time.perf_counter()
    done, skipped = run_models(models or [EMBEDDED_NAME], args.out, cfg)
    wall = time.perf_counter() - t0
    for res in done:
        print()
        print(format_tables(res.results))
    for name, reason in skipped:
        print(f"\nskipped {name}: {reason}")
    print("\nwritten:")
    for res in done:
        figures = sorted(p for paths in res.figure_files.values() for p in paths.values())
        print(f"  {res.path}")
        print(
            f"  {len(figures)} figure files in {res.path.parent} ({', '.join(sorted({Path(p).suffix for p in figures}))})"
        )
    if done and done[0].report_path is not None:
        print(f"  {done[0].report_path}")
    print(f"wall time: {wall:.1f} s")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .experiment.compare_config import COMPARE_GROUPS, CompareConfig
    from .experiment.compare_run import run_compare

    config = CompareConfig(**groups_from_args(args, COMPARE_GROUPS))
    t0 = time.perf_counter()
    res = run_compare(args.model, args.out, config)
    head = res.comparison.headline()
    print()
    print(res.comparison.paragraph())
    print()
    if "raw_largest" in head:
        r = head["raw_largest"]
        print(f"raw curve: largest spread over gauges {r['max_over_min']:.3g}-fold (K={r['K']})")
    if "circuit_max_rel_dev" in head:
        print(f"invariant curve: largest relative deviation over gauges {head['circuit_max_rel_dev']:.2e}")
    print("\nwritten:")
    for p in [res.path, *sorted(res.figure_files.values()), res.report_path]:
        print(f"  {p}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qk-subspace",
        description="Do attention heads share a low-dimensional QK subspace? PCA, exact injection, perplexity.",
    )
    parser.add_argument("--version", action="version", version=f"qk-subspace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the full experiment (6A/6B/6C, 2D map, gate) for one or more models")
    add_run_arguments(run)
    run.set_defaults(func=_cmd_run)
    compare = sub.add_parser(
        "compare",
        help="raw vs canonical vs gauge-invariant QK PCA on one model, under random gauges (figure, JSON, report)",
    )
    _model_argument(compare, several=False)
    from .experiment.compare_config import COMPARE_GROUPS

    add_group_arguments(compare, COMPARE_GROUPS)
    compare.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qk-subspace``; returns the exit status (2 on a user error, with a message)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    from .experiment.store import ConfigMismatchError

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
        ImportError,
    ) as exc:
        if os.environ.get("QK_SUBSPACE_DEBUG"):
            raise
        print(f"qk-subspace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
