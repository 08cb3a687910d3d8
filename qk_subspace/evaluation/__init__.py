"""Evaluation: perplexity and tokens, the sweep engine and the sweeps, diagnostics, importance, the gauge study."""
