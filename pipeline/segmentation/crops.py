"""Crops around a vertebra centroid (paper eq. 10: ``x_i = crop(X_i; v_i)``).

Every crop is an axis-aligned grid in patient LPS (identity direction) centred on the centroid,
resampled from the source image with SimpleITK, whatever the source orientation and spacing.
Array order is numpy's ``[z, y, x]``: axis 0 runs inferior -> superior, axis 1 anterior ->
posterior, axis 2 right -> left. The mid-sagittal plane of a crop is ``arr[:, :, centre]``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

#: HU window of the paper (section 3.2): clamp to [-2048, 8192] before the z-score.
HU_MIN, HU_MAX = -2048.0, 8192.0

#: Crop geometry of the shipped segmentation network: 64^3 voxels at 2 mm cover the paper's
#: 128 mm field (128^3 at 1 mm) with an eighth of the voxels, which a CPU can train.
CROP_SIZE = 64
CROP_SPACING_MM = 2.0


def reference_grid(centre_mm: Sequence[float], size: Sequence[int] | int,
                   spacing_mm: Sequence[float] | float) -> sitk.Image:
    """An empty LPS-aligned image of ``size`` (x, y, z) voxels of ``spacing_mm`` centred on ``centre_mm``."""
    size = [int(size)] * 3 if np.isscalar(size) else [int(s) for s in size]
    spacing = [float(spacing_mm)] * 3 if np.isscalar(spacing_mm) else [float(s) for s in spacing_mm]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    ref.SetOrigin([float(c) - (n - 1) / 2.0 * s for c, n, s in zip(centre_mm, size, spacing)])
    return ref


def resample(image: sitk.Image, ref: sitk.Image, linear: bool = True, default: float = 0.0,
             pixel_type: int = sitk.sitkFloat32) -> np.ndarray:
    """``image`` resampled onto the grid of ``ref``; returns the ``[z, y, x]`` array."""
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(image, ref, sitk.Transform(), interp, float(default), pixel_type)
    return sitk.GetArrayFromImage(out)


def source_box(image: sitk.Image, ref: sitk.Image, margin: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """Index box ``[lo, hi)`` (x, y, z) of the source ``image`` that covers the grid ``ref``."""
    size = np.array(ref.GetSize())
    corners = []
    for cx in (0, 1):
        for cy in (0, 1):
            for cz in (0, 1):
                idx = (np.array([cx, cy, cz]) * (size - 1)).astype(float)
                p = ref.TransformContinuousIndexToPhysicalPoint(idx.tolist())
                corners.append(image.TransformPhysicalPointToContinuousIndex(p))
    corners = np.array(corners)
    lo = np.maximum(np.floor(corners.min(axis=0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1 + margin, np.array(image.GetSize()))
    if np.any(hi <= lo):
        return None
    return lo, hi


def ct_crop(image: sitk.Image, centre_mm: Sequence[float], size: int, spacing_mm: float) -> np.ndarray:
    """The CT around ``centre_mm`` in HU (air outside the image), float32 ``[z, y, x]``.

    Only the source region under the crop is touched; it is block-averaged by the integer factor
    that the coarser crop spacing allows (anti-aliasing, as :func:`pipeline.preprocess.resample`)
    before the linear interpolation.
    """
    ref = reference_grid(centre_mm, size, spacing_mm)
    box = source_box(image, ref, margin=2)
    if box is None:
        return np.full((size, size, size), -1024.0, np.float32)
    lo, hi = box
    roi = sitk.RegionOfInterest(image, [int(v) for v in hi - lo], [int(v) for v in lo])
    factors = [max(1, int(np.floor(spacing_mm / s + 1e-6))) for s in roi.GetSpacing()]
    factors = [min(f, int(n)) for f, n in zip(factors, roi.GetSize())]
    if any(f > 1 for f in factors):
        roi = sitk.BinShrink(sitk.Cast(roi, sitk.sitkFloat32), factors)
    return resample(roi, ref, True, -1024.0)


def normalise(hu: np.ndarray) -> np.ndarray:
    """Clamp to [-2048, 8192] then z-score (paper section 3.2, eq. 19), per crop."""
    x = np.clip(hu.astype(np.float32), HU_MIN, HU_MAX)
    return (x - x.mean()) / np.sqrt(x.var() + 2.220e-16)


def array_image(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """Wrap a ``[z, y, x]`` array in an image with the geometry of ``ref``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.CopyInformation(ref)
    return img


def occupancy(labels: sitk.Image, label: int, centre_mm: Sequence[float], size: int,
              spacing_mm: float) -> np.ndarray:
    """Eighths (0..8) of each ``spacing_mm`` voxel of the crop that belong to ``label``."""
    fine = reference_grid(centre_mm, 2 * size, spacing_mm / 2.0)
    lab = resample(labels, fine, linear=False, default=0, pixel_type=sitk.sitkUInt8) == label
    return lab.reshape(size, 2, size, 2, size, 2).sum(axis=(1, 3, 5)).astype(np.uint8)
