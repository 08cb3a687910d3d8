"""The options of ``qk-subspace compare`` (torch-free, like :mod:`.config`): one group of its own plus the
``run`` group of :class:`~qk_subspace.experiment.config.RunOptions` (device, dtype, backend, resume, ...).
The CLI builds the subcommand from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import RunOptions, check_groups, flat_options, option, replaced_groups

__all__ = ["COMPARE_GROUPS", "CompareConfig", "CompareOptions"]


@dataclass(frozen=True)
class CompareOptions:
    """comparison"""

    tokens: str = option(
        "text",
        "text: perplexity on --text-file (default: the embedded model's samples, else WikiText-2); repeated: "
        "random blocks of --block tokens repeated to --ctx (induction data; needs no tokenizer)",
        kind="str",
        choices=("text", "repeated"),
    )
    text_file: str | None = option(
        None, "local text file (as for run)", kind="str", optional=True, metavar="PATH"
    )
    n_tokens: int = option(8192, "text tokens for perplexity", minimum=2, metavar="N")
    ctx: int | None = option(
        None, "chunk / sequence length (default: 256 on the embedded samples, else the model's n_ctx up to 1024)",
        minimum=2, optional=True,
    )  # fmt: skip
    block: int = option(16, "repeated tokens: block length", minimum=1)
    n_seqs: int = option(64, "repeated tokens: sequences", minimum=1)
    batch_size: int = option(8, "chunks per forward pass", minimum=1)
    ks: tuple[int, ...] | None = option(
        None,
        "K grid (default: every K up to 8, then 4 log-spaced up to K = all; 0 and K = all always added)",
        kind="ints",
        optional=True,
        metavar="K",
    )
    gauges: int = option(3, "random model-preserving gauges besides the model as loaded", minimum=0)
    seeds: int = option(3, "random subspaces per K (the null band)", minimum=1)
    cond: float = option(10.0, "condition-number bound of the random gauges", kind="float", minimum=1.0)
    gauge_seed: int = option(1, "seed of the first random gauge (then +1, +2, ...)")
    n_boot: int = option(1000, "bootstrap resamples for the confidence intervals", minimum=1)


COMPARE_GROUPS: dict[str, type] = {"compare": CompareOptions, "run": RunOptions}


@dataclass(frozen=True)
class CompareConfig:
    """Every option of ``qk-subspace compare``; checked on construction."""

    compare: CompareOptions = field(default_factory=CompareOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        check_groups(self, COMPARE_GROUPS)

    def replace(self, **changes: Any) -> CompareConfig:
        """A copy with options replaced by name (``gauges=1``, ``dtype="float64"``, ...)."""
        return CompareConfig(**replaced_groups(self, COMPARE_GROUPS, changes))

    def flat(self) -> dict[str, Any]:
        """``{option name: value}`` of every option."""
        return flat_options(self, COMPARE_GROUPS)
