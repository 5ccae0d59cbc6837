"""The pipeline's peak memory for a series, estimated from its headers before it is loaded.

A worker with a memory budget (``pipeline.memory_budget_mb``) fails a job whose series would
need more, with the reason, instead of being killed by the kernel half way (issue 28). The peak
is the fixed part (the interpreter, torch, the three networks, the outputs' libraries) plus the
larger of two phases:

- loading: the int16 volume and SimpleITK's copy of it (4 bytes a voxel);
- analysing: the volume and the label map with its copy (4 bytes a voxel), or the volume and the
  localization's heatmaps (one float32 channel per level on the 4 mm grid of the whole field of
  view), whichever is larger.

For the phantoms of ``bench/process.py --slices 300,1200,2000`` (512 x 512 at 0.5625 mm, 3 mm
slices) it says 1400, 2300 and 3100 MB where the benchmark measured 1318, 1813 and 2506 MB
(bench/README.md): it errs on the safe side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: Interpreter, libraries, the three networks and the outputs' builders (MB).
FIXED_MB = 1100.0
#: Bytes per source voxel while loading (int16 volume + SimpleITK's copy) and while the label
#: map is made (volume + label map + its copy).
BYTES_PER_VOXEL = 4.0
#: Bytes per source voxel held beside the heatmaps (the int16 volume).
VOLUME_BYTES_PER_VOXEL = 2.0
#: The localization grid (mm) and its channels (levels); one float32 stack is held.
GRID_MM = 4.0
HEATMAP_CHANNELS = 26


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
    heatmaps = grid * HEATMAP_CHANNELS * 4
    phases = (size.voxels * BYTES_PER_VOXEL, size.voxels * VOLUME_BYTES_PER_VOXEL + heatmaps)
    return FIXED_MB + max(phases) / 2**20


def over_budget(size: SeriesSize, budget_mb: float) -> str | None:
    """The reason a job on this series must not start under ``budget_mb``, or None."""
    need = estimate_peak_mb(size)
    if need <= budget_mb:
        return None
    return (f"the series ({size.slices} slices of {size.rows}x{size.columns}, "
            f"{size.extent_mm[2]:.0f} mm long) needs about {need:.0f} MB, more than "
            f"pipeline.memory_budget_mb ({budget_mb:.0f} MB); raise the budget where the worker "
            f"has the memory, or send a shorter series")
