"""report.md and printed tables of a run; every function reads the results JSON only."""

from __future__ import annotations

from .markdown import render_report
from .reference import REFERENCE_GPT2_SMALL, is_gpt2_small
from .tables import format_tables, result_tables

__all__ = ["REFERENCE_GPT2_SMALL", "format_tables", "is_gpt2_small", "render_report", "result_tables"]
