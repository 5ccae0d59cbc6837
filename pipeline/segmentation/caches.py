"""Names of the training caches: one place, so that every trainer and its tests agree.

Each phantom seed's crops are generated once and cached under a run's cache folder; a cache
name carries what makes its content differ (seed, grid, crop geometry).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.segmentation.crops import CROP_SIZE, CROP_SPACING_MM


def geometry_tag(size: int = CROP_SIZE, spacing_mm: float = CROP_SPACING_MM) -> str:
    """Cache file name part of a crop geometry: empty for the shipped one (its caches keep their
    names), else ``-c<size>x<spacing>mm``."""
    if int(size) == CROP_SIZE and float(spacing_mm) == CROP_SPACING_MM:
        return ""
    return f"-c{int(size)}x{float(spacing_mm):g}mm"


def seg_cache_path(cache_dir: Path, seed: int, spacing_mm: float | None = None,
                   crop_size: int = CROP_SIZE, crop_spacing_mm: float = CROP_SPACING_MM) -> Path:
    """The segmentation crops of phantom ``seed`` (its own acquisition grid where
    ``spacing_mm`` is None)."""
    tag = "acq" if spacing_mm is None else f"{spacing_mm:g}mm"
    return Path(cache_dir) / f"seg-phantom-{seed}-{tag}{geometry_tag(crop_size, crop_spacing_mm)}.npz"


def keypoint_cache_path(cache_dir: Path, seed: int, spacing_mm: float | None = None) -> Path:
    """The keypoint network's planes of phantom ``seed``."""
    tag = "acq" if spacing_mm is None else f"{spacing_mm:g}mm"
    return Path(cache_dir) / f"kp-phantom-{seed}-{tag}.npz"


def refine_cache_path(cache_dir: Path, seed: int) -> Path:
    """The refiner's 1 mm crops of phantom ``seed`` (:mod:`pipeline.segmentation.train_refiner`)."""
    return Path(cache_dir) / f"ref-phantom-{seed}-acq.npz"
