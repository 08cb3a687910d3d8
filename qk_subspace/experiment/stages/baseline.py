"""The baseline: the unedited model's perplexity on the evaluation tokens (one point).

Kept with its per-chunk NLL, so points evaluated after a resume pair with exactly the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...evaluation.perplexity import PerplexityResult, perplexity
from ..context import RunContext
from .base import PointLog, Stage

__all__ = ["BaselineStage"]


class BaselineStage(Stage):
    name = "baseline"

    def total(self, ctx: RunContext) -> int:
        return 1

    def done(self, ctx: RunContext, data: dict[str, Any]) -> int:
        return int("baseline" in data)

    def run(self, ctx: RunContext, data: dict[str, Any], log: PointLog) -> None:
        if "baseline" in data:
            b = data["baseline"]
            nll = np.asarray(b["nll_per_chunk"], dtype=np.float64)
            ctx.baseline = PerplexityResult(b["ppl"], b["mean_nll"], nll, b["n_predicted_tokens"])
            return
        c = ctx.config
        ctx.baseline = base = perplexity(
            ctx.model, ctx.tokens, batch_size=c.text.batch_size, progress=c.run.progress, desc="baseline"
        )
        data["baseline"] = {
            "ppl": base.ppl,
            "mean_nll": base.mean_nll,
            "n_predicted_tokens": base.n_tokens,
            "nll_per_chunk": base.nll_per_chunk.tolist(),
        }
        log.finish("baseline")
