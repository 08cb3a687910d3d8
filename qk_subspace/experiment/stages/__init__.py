"""The stages a run is built from, in the order they run (see :mod:`.base` for the protocol)."""

from __future__ import annotations

from .base import PointLog, Stage
from .baseline import BaselineStage
from .clustering import ClusteringStage, pca_map_rows
from .diagnostics import DiagnosticsStage
from .gauges import GaugeStage
from .importance import ImportanceStage
from .ksweep import KSweepStage
from .layerwise import LayerwiseStage
from .nulls import NullBaselinesStage
from .variance import VarianceStage, variance_summary

__all__ = ["STAGES", "PointLog", "Stage", "pca_map_rows", "variance_summary"]

#: Every stage, in run order; a run uses those whose ``enabled(config)`` is true.
STAGES: tuple[Stage, ...] = (
    BaselineStage(),
    VarianceStage(),
    KSweepStage(),
    DiagnosticsStage(),
    ImportanceStage(),
    ClusteringStage(),
    LayerwiseStage(),
    NullBaselinesStage(),
    GaugeStage(),
)
