"""The pipeline's peak memory for a series, estimated from its headers before it is loaded.

A worker with a memory budget (``pipeline.memory_budget_mb``) fails a job whose series would
need more, with the reason, instead of being killed by the kernel half way (issue 28). The peak
(``bench/process.py --slices 300,1200,2000``, bench/README.md) has three parts:

- a fixed part: the interpreter, torch and the three networks;
- the series: while it is loaded, its int16 volume and SimpleITK's copy of it (4 bytes a
  voxel); later the volume, the label map and the SEG's frames (about as much);
- the localization's heatmaps: one float32 channel per level on the 4 mm grid of the whole
  field of view, accumulated and normalised (two stacks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: Interpreter, libraries and the three networks (MB).
FIXED_MB = 700.0
#: Bytes per source voxel at the peak (see the module docstring).
BYTES_PER_VOXEL = 4.0
#: The localization grid (mm), its channels (levels) and the float32 stacks held at once.
GRID_MM = 4.0
HEATMAP_CHANNELS = 26
HEATMAP_STACKS = 2


@dataclass(frozen=True)
class SeriesSize:
    """What the headers say of a series' size: its voxels and its field of view (mm)."""

    rows: int
    columns: int
    slices: int
    extent_mm: tuple[float, float, float]

    @property
    def voxels(self) -> int:
        return self.rows * self.columns * self.slices


def estimate_peak_mb(size: SeriesSize) -> float:
    """Peak resident memory (MB) of ``process`` / a worker's job on a series of ``size``."""
    grid = math.prod(max(1, math.ceil(e / GRID_MM)) for e in size.extent_mm)
    heatmaps = grid * HEATMAP_CHANNELS * 4 * HEATMAP_STACKS
    return FIXED_MB + (size.voxels * BYTES_PER_VOXEL + heatmaps) / 2**20


def over_budget(size: SeriesSize, budget_mb: float) -> str | None:
    """The reason a job on this series must not start under ``budget_mb``, or None."""
    need = estimate_peak_mb(size)
    if need <= budget_mb:
        return None
    return (f"the series ({size.slices} slices of {size.rows}x{size.columns}, "
            f"{size.extent_mm[2]:.0f} mm long) needs about {need:.0f} MB, more than "
            f"pipeline.memory_budget_mb ({budget_mb:.0f} MB); raise the budget where the worker "
            f"has the memory, or send a shorter series")
