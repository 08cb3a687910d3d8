"""Every option of a run, in one place: nested config dataclasses whose fields also define the CLI.

Each field of the option groups (:class:`TextOptions`, :class:`SweepOptions`, :class:`CircuitOptions`,
:class:`StudyOptions`, :class:`RunOptions`, :class:`ExecutionOptions`) carries an :class:`Option` in its metadata: help text, the
CLI flag, allowed values, bounds. :mod:`qk_subspace.cli` builds the ``run`` subcommand from these
fields, and :meth:`ExperimentConfig.validate` checks every value against them, so a new option is one
field. Option names are unique across groups: ``config.replace(n_tokens=4096)`` and
``run_experiment(..., n_tokens=4096)`` address a field by its name.

This module imports neither torch nor the runner (``qk-subspace --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DTYPES",
    "CircuitOptions",
    "ExecutionOptions",
    "ExperimentConfig",
    "Option",
    "RunOptions",
    "StudyOptions",
    "SweepOptions",
    "TextOptions",
    "option",
]

#: The seed report's grid of cluster counts k (GPT-2 small).
REPORT_CLUSTER_GRID = (4, 8, 12, 16, 32, 64)
#: Parameter dtypes a run can load the model in (names of ``torch`` dtypes).
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class Option:
    """How one config field is offered and checked.

    Attributes:
        help: the help text (the CLI adds the default).
        kind: ``"int"``, ``"float"``, ``"str"``, ``"bool"``, ``"ints"`` (a list of integers; the CLI
            takes ``1,3,10`` or ``1 3 10``) or ``"n_tokens"`` (an integer or ``all``).
        choices: allowed values (``None``: any of the kind).
        minimum: smallest allowed value of an ``"int"``/``"float"`` (or of every entry of ``"ints"``).
        optional: ``None`` is allowed (the default decides).
        flag: the CLI flag (default ``--name-with-dashes``; booleans that default to True get ``--no-...``).
        metavar: the CLI metavar.
    """

    help: str
    kind: str = "int"
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    optional: bool = False
    flag: str | None = None
    metavar: str | None = None

    def flag_for(self, name: str, default: Any) -> str:
        if self.flag is not None:
            return self.flag
        dashed = name.replace("_", "-")
        return f"--no-{dashed}" if self.kind == "bool" and default is True else f"--{dashed}"


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with an :class:`Option` (tuples are stored as given; lists become tuples)."""
    return field(default=default, metadata={"option": Option(help=help, **spec)})


@dataclass(frozen=True)
class TextOptions:
    """evaluation text"""

    text_file: str | None = option(
        None,
        "local text: a wiki.*.raw file gives the WikiText-2 protocol, anything else is chunked as plain "
        "text (default: WikiText-2 test via `datasets`)",
        kind="str",
        optional=True,
        metavar="PATH",
    )
    text_format: str = option(
        "auto",
        "auto: wiki.*.raw is WikiText-2, anything else plain; wikitext: rows joined with blank lines; "
        "plain: the file as is",
        kind="str",
        choices=("auto", "wikitext", "plain"),
    )
    split: str = option("test", "WikiText-2 split for the `datasets` route", kind="str")
    n_tokens: int | None = option(
        200_000,
        "first N tokens of the stream ('all' for everything; 200000 = 195 x 1024)",
        kind="n_tokens",
        minimum=2,
        optional=True,
        metavar="N",
    )
    ctx: int | None = option(None, "chunk length (default min(1024, model n_ctx))", minimum=2, optional=True)
    batch_size: int = option(8, "chunks per forward pass", minimum=1)


@dataclass(frozen=True)
class SweepOptions:
    """sweeps"""

    ks: tuple[int, ...] | None = option(
        None,
        "K grid, e.g. 1,3,10,144 (default: the report's grid scaled to the number of heads; K=all and "
        "the gate K are always added)",
        kind="ints",
        optional=True,
        metavar="K",
    )
    cluster_ks: tuple[int, ...] = option(
        REPORT_CLUSTER_GRID,
        "cluster counts k (k >= n_heads are dropped)",
        kind="ints",
        minimum=1,
        metavar="k",
    )
    n_dims: int | None = option(
        None, "PCA coordinates for k-means (default: 20, or the PCA's number of components if fewer)", minimum=1,
        optional=True,
    )  # fmt: skip
    map_k: int | None = option(None, "k that colours the 2D map (default: the smallest k)", optional=True)
    seed: int = option(0, "k-means and bootstrap seed")
    n_boot: int = option(2000, "bootstrap resamples for the confidence intervals", minimum=1)
    gate_k: int = option(10, "the gate's K (the report: K=10)", minimum=0)
    gate_threshold: float = option(1.1, "the gate's largest perplexity ratio", kind="float", minimum=0.0)


@dataclass(frozen=True)
class CircuitOptions:
    """circuit, component order, diagnostics"""

    circuit: Literal["qk", "ov"] = option(
        "qk",
        "qk: W_QK edited through W_Q; ov: head-space OV circuits edited through W_V",
        kind="str",
        choices=("qk", "ov"),
    )
    order: Literal["variance", "importance"] = option(
        "variance",
        "importance: also rank components (--importance-method) and sweep K over that order; writes the "
        "orderings and an overlay figure",
        kind="str",
        choices=("variance", "importance"),
    )
    importance_method: Literal["drop_one", "gradient"] = option(
        "drop_one", "how --order importance ranks components", kind="str", choices=("drop_one", "gradient")
    )
    importance_tokens: int = option(
        32_768,
        "tokens for the ranking, taken from the text after the perplexity (and diagnostic) tokens",
        minimum=2,
    )
    diagnostics: bool = option(
        False,
        "per-head attention-pattern metrics per K (attention_diagnostics) and their figures",
        kind="bool",
    )
    diag_seqs: int = option(8, "diagnostic batch: sequences", minimum=1)
    diag_ctx: int = option(128, "diagnostic batch: tokens per sequence", minimum=2)
    head_scores: bool = option(
        True, "skip the previous-token/duplicate-token/induction scores in the diagnostics", kind="bool"
    )


@dataclass(frozen=True)
class StudyOptions:
    """PCA space, per-layer PCA, null baselines, gauges (QK only)"""

    space: Literal["raw", "canonical", "circuit"] = option(
        "raw",
        "raw: PCA of W_Q^T W_K (the report); canonical: the same in the canonical gauge; circuit: "
        "gauge-invariant PCA of the circuits W_Q W_K^T (per rotary pair on rotary models), realised jointly "
        "through W_Q and W_K (residual recorded)",
        kind="str",
        choices=("raw", "canonical", "circuit"),
    )
    groupby: str | None = option(
        None,
        "layer: also one PCA per layer (K per layer, clipped to heads per layer) compared with the global "
        "PCA at equal parameter count",
        kind="str",
        choices=("layer",),
        optional=True,
    )
    baselines: bool = option(
        False,
        "null baselines: spectrum nulls (shuffled / Gaussian heads, Marchenko-Pastur) and random K-dim "
        "subspaces (perplexity)",
        kind="bool",
    )
    baseline_seeds: int = option(3, "seeds of the null models and random subspaces per K", minimum=1)
    gauges: int = option(
        0,
        "N > 0: gauge study, raw and circuit curves under N random gauges ((N+1) x (1 + 2 x len(K grid)) "
        "evaluations)",
        minimum=0,
        metavar="N",
    )


@dataclass(frozen=True)
class RunOptions:
    """run"""

    device: str | None = option(
        None, "cpu, cuda, ... (default: TransformerLens' choice)", kind="str", optional=True
    )
    dtype: str = option("float32", "parameter dtype of the model", kind="str", choices=DTYPES)
    backend: str = option(
        "auto",
        "TransformerLens model class: hooked (HookedTransformer, transformer-lens 3.x), bridge "
        "(TransformerBridge) or auto (hooked where it exists, else bridge)",
        kind="str",
        choices=("auto", "hooked", "bridge"),
    )
    resume: bool = option(
        False,
        "continue the run in --out, skipping finished points (refuses another configuration)",
        kind="bool",
    )
    overwrite: bool = option(False, "replace existing results of the same model", kind="bool")
    png: bool = option(True, "write HTML figures only (no PNG)", kind="bool")
    progress: bool = option(True, "no progress bars", kind="bool")


@dataclass(frozen=True)
class ExecutionOptions:
    """execution (where the points are evaluated; see docs/cluster.md)"""

    executor: str = option(
        "serial",
        "serial (every point here, one after the other) or ray (points on Ray workers that each load the "
        "model once; needs the ray extra)",
        kind="str",
        choices=("serial", "ray"),
    )
    ray_address: str | None = option(
        None,
        "Ray cluster to join: auto (the cluster this machine belongs to), HOST:PORT, or local (a new local "
        "instance) (default: a cluster started on this machine, else a new local instance)",
        kind="str",
        optional=True,
        metavar="ADDRESS",
    )
    workers: int | None = option(
        None,
        "Ray workers (default: the cluster's CPUs / --threads-per-worker, or its GPUs / --gpus-per-worker)",
        minimum=1,
        optional=True,
    )
    gpus_per_worker: float = option(
        0.0,
        "GPUs each Ray worker reserves (fractions share a GPU; > 0 loads the workers' model on cuda)",
        kind="float",
    )
    threads_per_worker: int = option(1, "CPUs each Ray worker reserves and torch threads it uses", minimum=1)
    gate: bool = option(
        True, "run every model of --model A B ... even if an earlier one fails the gate", kind="bool"
    )


GROUPS: dict[str, type] = {
    "text": TextOptions,
    "sweeps": SweepOptions,
    "circuits": CircuitOptions,
    "studies": StudyOptions,
    "run": RunOptions,
    "execution": ExecutionOptions,
}


def fields_of(group: type) -> Iterator[tuple[dataclasses.Field, Option]]:
    """The fields of an option group with their :class:`Option`."""
    for f in dataclasses.fields(group):
        yield f, f.metadata["option"]


@dataclass(frozen=True)
class ExperimentConfig:
    """Every option of a run, grouped (all defaults reproduce the seed report's protocol).

    ``ExperimentConfig()`` is the report's protocol; ``ExperimentConfig().replace(n_tokens=4096, ks=(1, 3))``
    changes options by name. Values are checked on construction (:meth:`validate`).
    """

    text: TextOptions = field(default_factory=TextOptions)
    sweeps: SweepOptions = field(default_factory=SweepOptions)
    circuits: CircuitOptions = field(default_factory=CircuitOptions)
    studies: StudyOptions = field(default_factory=StudyOptions)
    run: RunOptions = field(default_factory=RunOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- access
    @staticmethod
    def group_of(name: str) -> str:
        """The group holding option ``name`` (``TypeError`` naming the allowed options if none does)."""
        return group_of(name, GROUPS)

    @staticmethod
    def option_names() -> list[str]:
        return [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]

    def value(self, name: str) -> Any:
        """The value of option ``name``."""
        return getattr(getattr(self, self.group_of(name)), name)

    def flat(self) -> dict[str, Any]:
        """``{option name: value}`` of every option."""
        return flat_options(self, GROUPS)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with options (by name) or whole groups (``text=TextOptions(...)``) replaced."""
        return ExperimentConfig(**replaced_groups(self, GROUPS, changes))

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every option against its :class:`Option` and the rules between options.

        Raises ``ValueError`` (``TypeError`` for a group of the wrong type) naming the option and its flag.
        """
        check_groups(self, GROUPS)
        if self.sweeps.ks is not None and not self.sweeps.ks:
            raise ValueError("ks (--ks) must contain at least one K (or be None for the default grid)")
        self._check_representation()
        e = self.execution
        if e.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker (--gpus-per-worker) must be >= 0, got {e.gpus_per_worker!r}")
        if e.executor == "serial" and (
            e.workers is not None or e.ray_address is not None or e.gpus_per_worker
        ):
            raise ValueError("--workers, --ray-address and --gpus-per-worker need --executor ray")

    def _check_representation(self) -> None:
        """The representation of ``--circuit`` x ``--space`` must exist and support the options asked for."""
        from ..representations import REGISTRY

        c, s = self.circuits.circuit, self.studies.space
        chosen = f"--circuit {c}" if s == "raw" else f"--space {s} with --circuit {c}"
        rep = next((r for r in REGISTRY.values() if r.circuit == c and r.space == s), None)
        if rep is None:
            raise ValueError(
                f"--space {s} and --circuit {c} cannot be combined: no representation of the {c!r} circuit "
                f"in the {s!r} space (representations: {', '.join(REGISTRY)}); use --circuit qk or --space raw"
            )
        asked = [
            ("groupby", f"--groupby {self.studies.groupby}", self.studies.groupby is not None),
            ("baselines", "--baselines", self.studies.baselines),
            ("gauges", f"--gauges {self.studies.gauges}", self.studies.gauges > 0),
            ("importance", "--order importance", self.circuits.order == "importance"),
            ("diagnostics", "--diagnostics", self.circuits.diagnostics),
        ]
        refused = [flag for opt, flag, on in asked if on and not rep.supported(opt)]
        if refused:
            able = [r.name for r in REGISTRY.values() if all(r.supported(o) for o, _, on in asked if on)]
            raise ValueError(
                f"{', '.join(refused)} cannot be combined with {chosen} (the {rep.name!r} representation "
                f"supports {', '.join(sorted(rep.supports))}); representations that support it: "
                f"{', '.join(able) or 'none'}"
            )

    @property
    def representation(self) -> str:
        """The registered name of the representation of ``circuit`` x ``space`` (``"qk"``, ``"qk-circuit"``, ...)."""
        from ..representations import for_circuit_and_space

        return for_circuit_and_space(self.circuits.circuit, self.studies.space).name


def group_of(name: str, groups: dict[str, type]) -> str:
    """The group of ``groups`` holding option ``name`` (``TypeError`` naming the allowed options if none does)."""
    for group, cls in groups.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return group
    names = sorted(f.name for cls in groups.values() for f in dataclasses.fields(cls))
    raise TypeError(f"unknown option {name!r}; options are {names}")


def flat_options(config: Any, groups: dict[str, type]) -> dict[str, Any]:
    """``{option name: value}`` of every option of every group of ``config``."""
    return {
        f.name: getattr(getattr(config, g), f.name)
        for g, cls in groups.items()
        for f in dataclasses.fields(cls)
    }


def replaced_groups(config: Any, groups: dict[str, type], changes: dict[str, Any]) -> dict[str, Any]:
    """``config``'s groups with options (by name) or whole groups replaced (lists become tuples)."""
    out = {g: getattr(config, g) for g in groups}
    per_group: dict[str, dict[str, Any]] = {}
    for name, value in changes.items():
        if name in groups:
            out[name] = value
        else:
            per_group.setdefault(group_of(name, groups), {})[name] = _normalise(value)
    for g, vals in per_group.items():
        out[g] = dataclasses.replace(out[g], **vals)
    return out


def check_groups(config: Any, groups: dict[str, type]) -> None:
    """Check every option of every group of ``config`` (and that resume and overwrite exclude each other)."""
    for g, cls in groups.items():
        group = getattr(config, g)
        if not isinstance(group, cls):
            raise TypeError(f"{g} must be a {cls.__name__}, got {type(group).__name__}")
        for f, opt in fields_of(cls):
            _check(f.name, opt, getattr(group, f.name), f.default)
    run = getattr(config, "run", None)
    if run is not None and run.resume and run.overwrite:
        raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other")


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def flag_name(name: str) -> str:
    """The CLI flag of option ``name``."""
    group = GROUPS[ExperimentConfig.group_of(name)]
    f = next(f for f in dataclasses.fields(group) if f.name == name)
    return f.metadata["option"].flag_for(name, f.default)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check(name: str, opt: Option, value: Any, default: Any) -> None:
    """Check one option value against its :class:`Option`; the error names the option and its flag."""
    where = f"{name} ({opt.flag_for(name, default)})"
    if value is None:
        if opt.optional:
            return
        raise ValueError(f"{where} must be given, got None")
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be True or False, got {value!r}")
        return
    if opt.kind == "ints":
        if not isinstance(value, tuple) or not all(_is_int(v) for v in value):
            raise ValueError(f"{where} must be a tuple of integers, got {value!r}")
        for v in value:
            if opt.minimum is not None and v < opt.minimum:
                raise ValueError(f"{where}: values must be integers >= {opt.minimum:g}, got {v!r}")
        return
    if opt.kind in ("int", "n_tokens") and not _is_int(value):
        raise ValueError(f"{where} must be an integer{_bound(opt)}, got {value!r}")
    if opt.kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"{where} must be a number{_bound(opt)}, got {value!r}")
    if opt.kind == "str" and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"{where} must be one of {list(opt.choices)}, got {value!r}")
    if opt.minimum is not None and not _above(value, opt):
        raise ValueError(f"{where} must be {_bound(opt).strip()}, got {value!r}")


def _above(value: Any, opt: Option) -> bool:
    assert opt.minimum is not None
    return value > opt.minimum if opt.kind == "float" else value >= opt.minimum


def _bound(opt: Option) -> str:
    if opt.minimum is None:
        return ""
    return f" > {opt.minimum:g}" if opt.kind == "float" else f" >= {opt.minimum:g}"
