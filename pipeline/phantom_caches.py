"""The phantom caches that two trainers read: one phantom generation per seed writes the
segmentation network's crops (:mod:`pipeline.segmentation.dataset`) and, for the shipped crop
geometry, the keypoint network's sagittal planes (:mod:`pipeline.keypoints.dataset`) beside them
(cache names: :mod:`pipeline.segmentation.caches`). Neither trainer imports the other's dataset.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.seeds import refuse_evaluation_seeds
from pipeline.segmentation.caches import geometry_tag, keypoint_cache_path, seg_cache_path
from pipeline.segmentation.crops import CROP_SIZE, CROP_SPACING_MM, reference_grid
from pipeline.segmentation.dataset import Sample, case_samples, load_samples, margin_for, save_samples


def phantom_samples(seed: int, spacing_mm: float | None = None, keypoint_path: Path | None = None,
                    n_keypoint_aug: int = 6, crop_size: int = CROP_SIZE,
                    crop_spacing_mm: float = CROP_SPACING_MM) -> list[Sample]:
    """Samples of phantom ``seed`` on its randomised acquisition grid (``spacing_mm=None``),
    crops of ``crop_size`` voxels of ``crop_spacing_mm`` (plus :func:`margin_for` on each side).

    With ``keypoint_path``, the keypoint network's samples of the same phantom are written there
    too (one phantom generation for both models).
    """
    refuse_evaluation_seeds([seed])
    from pipeline.phantom import generate

    ph = generate(seed, spacing_mm=spacing_mm)
    verts = ph.gt["vertebrae"]
    samples = case_samples(f"phantom-{seed}", ph.ct, ph.labels, verts, crop_size, crop_spacing_mm,
                           margin_for(crop_spacing_mm))
    if keypoint_path is not None:
        from pipeline.keypoints.dataset import keypoint_samples, save_keypoint_samples
        from pipeline.segmentation.crops import array_image

        n = samples[0].occupancy.shape[0] if samples else 0
        fgs = [array_image(sm.occupancy.astype(np.float32) / 8.0,
                           reference_grid(v["centroid_mm"], n, crop_spacing_mm))
               for sm, v in zip(samples, verts)]
        kps = keypoint_samples(ph.ct, verts, fgs, np.random.default_rng(seed), n_keypoint_aug,
                               f"phantom-{seed}")
        save_keypoint_samples(kps, keypoint_path)
    return samples


def write_phantom_cache(seed: int, cache_dir: Path, spacing_mm: float | None = None,
                        crop_size: int = CROP_SIZE, crop_spacing_mm: float = CROP_SPACING_MM) -> Path:
    """Generate phantom ``seed`` once and write its segmentation samples (and, for the shipped
    crop geometry, the keypoint network's)."""
    path = seg_cache_path(cache_dir, seed, spacing_mm, crop_size, crop_spacing_mm)
    shipped = geometry_tag(crop_size, crop_spacing_mm) == ""
    kp_path = keypoint_cache_path(cache_dir, seed, spacing_mm) if shipped else None
    save_samples(phantom_samples(seed, spacing_mm, kp_path, crop_size=crop_size,
                                 crop_spacing_mm=crop_spacing_mm), path)
    return path


def cached_phantom_samples(seeds: Iterable[int], cache_dir: Path, spacing_mm: float | None = None,
                           log=print, workers: int = 1, crop_size: int = CROP_SIZE,
                           crop_spacing_mm: float = CROP_SPACING_MM) -> list[Sample]:
    """Samples of several phantoms, each generated once and cached under ``cache_dir``
    (the missing ones by ``workers`` processes)."""
    from functools import partial

    from pipeline.training import generate_parallel

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    geo = {"crop_size": crop_size, "crop_spacing_mm": crop_spacing_mm}
    missing = [s for s in seeds if not seg_cache_path(cache_dir, s, spacing_mm, **geo).exists()]
    generate_parallel(missing, partial(write_phantom_cache, cache_dir=cache_dir, spacing_mm=spacing_mm, **geo),
                      workers, log)
    out: list[Sample] = []
    for seed in seeds:
        out.extend(load_samples(seg_cache_path(cache_dir, seed, spacing_mm, **geo)))
    return out
