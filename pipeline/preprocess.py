"""Image preprocessing shared by training and inference (paper section 3.2; DESIGN.md step 1).

1. Reorient to one convention: index axes run towards patient Left, Posterior, Superior (LPS, the
   DICOM patient system), so ``array[z, y, x]`` has ``z`` cranial-ward, ``y`` posterior-ward,
   ``x`` left-ward.
2. Resample to an isotropic grid with SimpleITK (block averaging by integer factors first, which
   anti-aliases and is fast, then linear interpolation onto the exact grid).
3. Clamp to [-2048, 8192] HU and z-score the whole volume (paper eq. 19).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

CLAMP_HU = (-2048.0, 8192.0)
#: epsilon of eq. 19 (the paper's "very small constant", float64 machine epsilon).
EPS = 2.220e-16
AIR_HU = -1024.0
ORIENTATION = "LPS"


def reorient(image: sitk.Image) -> sitk.Image:
    """The image with its index axes permuted/flipped to run towards L, P, S (no resampling)."""
    if sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == ORIENTATION:
        return image
    return sitk.DICOMOrient(image, ORIENTATION)


def resample(image: sitk.Image, spacing_mm: float | tuple[float, float, float],
             interpolator: int = sitk.sitkLinear, default_value: float = AIR_HU,
             antialias: bool = True, extent_mm: Sequence[float] | None = None) -> sitk.Image:
    """Resample onto a grid of ``spacing_mm`` covering the same physical extent.

    The new grid keeps the image's origin corner and direction. With ``antialias`` (intensity
    images), each axis is first block-averaged by the largest integer factor not exceeding the
    spacing ratio (``BinShrink``), which removes most aliasing at a fraction of a Gaussian's cost.
    Label images: pass ``sitk.sitkNearestNeighbor`` and ``antialias=False``. ``extent_mm``: the
    physical extent to cover where ``image`` is already block-averaged (:func:`shrink_in_slabs`
    drops the last incomplete block, as ``BinShrink`` does): that of the image before it.
    """
    if np.isscalar(spacing_mm):
        spacing_mm = (float(spacing_mm),) * 3
    new_spacing = np.asarray(spacing_mm, dtype=float)
    old_spacing = np.asarray(image.GetSpacing(), dtype=float)
    old_size = np.asarray(image.GetSize())
    extent = old_spacing * old_size if extent_mm is None else np.asarray(extent_mm, dtype=float)
    if antialias:
        factors = [max(1, int(math.floor(n / o + 1e-6))) for n, o in zip(new_spacing, old_spacing)]
        if any(f > 1 for f in factors):
            image = sitk.BinShrink(image, factors)
    new_size = [max(1, int(math.ceil(e / s - 1e-6))) for e, s in zip(extent, new_spacing)]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    # Keep the outer corner of the first voxel in place: origin moves by half the spacing change.
    origin = np.asarray(image.GetOrigin()) + direction @ ((new_spacing - np.asarray(image.GetSpacing())) / 2)
    return sitk.Resample(image, new_size, sitk.Transform(), interpolator, origin.tolist(),
                         new_spacing.tolist(), image.GetDirection(), float(default_value),
                         image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32)


#: Slices of the source cast to float32 at a time by :func:`shrink_in_slabs` (a multiple of the
#: block size is taken).
SLAB_SLICES = 64


def shrink_factors(image: sitk.Image, spacing_mm: float | tuple[float, float, float]) -> list[int]:
    """The integer block-averaging factors of :func:`resample` for ``image``."""
    if np.isscalar(spacing_mm):
        spacing_mm = (float(spacing_mm),) * 3
    return [max(1, int(math.floor(n / o + 1e-6))) for n, o in zip(spacing_mm, image.GetSpacing())]


def shrink_in_slabs(image: sitk.Image, spacing_mm: float | tuple[float, float, float]) -> sitk.Image:
    """``BinShrink`` of ``image`` (cast to float32) by :func:`shrink_factors`, computed on slabs
    of about :data:`SLAB_SLICES` slices, each a whole number of blocks: the same voxels as the
    whole volume's ``BinShrink``, with one slab in float32 at a time. The result then goes
    through :func:`resample`, whose own block averaging finds nothing left to do."""
    factors = shrink_factors(image, spacing_mm)
    if not any(f > 1 for f in factors):
        return sitk.Cast(image, sitk.sitkFloat32)
    fz = factors[2]
    n_out = image.GetSize()[2] // fz
    if n_out == 0:
        return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    step = max(1, SLAB_SLICES // fz) * fz
    parts, first = [], None
    for z0 in range(0, n_out * fz, step):
        z1 = min(z0 + step, n_out * fz)
        slab = sitk.BinShrink(sitk.Cast(image[:, :, z0:z1], sitk.sitkFloat32), factors)
        if first is None:
            first = slab
        parts.append(sitk.GetArrayFromImage(slab))
    out = sitk.GetImageFromArray(np.concatenate(parts, axis=0))
    out.SetSpacing(first.GetSpacing())
    out.SetOrigin(first.GetOrigin())
    out.SetDirection(first.GetDirection())
    return out


def clamp(array: np.ndarray) -> np.ndarray:
    """Clamp HU to [-2048, 8192] (paper section 3.2)."""
    return np.clip(array, *CLAMP_HU)


def zscore_stats(array: np.ndarray) -> tuple[float, float]:
    """Mean and ``sqrt(var + eps)`` of the whole volume (paper eq. 19)."""
    a = np.asarray(array, dtype=np.float32)
    return float(a.mean(dtype=np.float64)), math.sqrt(float(a.var(dtype=np.float64)) + EPS)


def zscore(array: np.ndarray) -> np.ndarray:
    """Paper eq. 19: ``(x - mean) / sqrt(var + eps)`` over the whole volume."""
    mean, std = zscore_stats(array)
    return ((np.asarray(array, dtype=np.float32) - mean) / std).astype(np.float32)


def normalize(array: np.ndarray) -> np.ndarray:
    """Clamp then z-score."""
    return zscore(clamp(array))


@dataclass
class Prepared:
    """A volume ready for a network.

    Attributes:
        image: the reoriented, resampled image (float32 HU, LPS axes) that defines the grid.
        array: ``image`` as ``[z, y, x]`` float32, clamped and z-scored.
        pad_value: the z-scored value of air (-1024 HU).
    """

    image: sitk.Image
    array: np.ndarray
    #: the normalised value of air (-1024 HU): what patches are padded with beyond the volume.
    pad_value: float = 0.0

    def index_to_mm(self, zyx: np.ndarray) -> np.ndarray:
        """Continuous ``[z, y, x]`` indices (N x 3) to patient LPS millimetres (N x 3)."""
        zyx = np.atleast_2d(np.asarray(zyx, dtype=float))
        return np.array([self.image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
                         for z, y, x in zyx])

    def mm_to_index(self, xyz_mm: np.ndarray) -> np.ndarray:
        """Patient LPS millimetres (N x 3) to continuous ``[z, y, x]`` indices (N x 3)."""
        pts = np.atleast_2d(np.asarray(xyz_mm, dtype=float))
        out = [self.image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in pts]
        return np.array([[z, y, x] for x, y, z in out]).reshape(-1, 3)


def prepare(image: sitk.Image, spacing_mm: float) -> Prepared:
    """Reorient, resample to ``spacing_mm`` isotropic, clamp and z-score.

    The block averaging runs slab by slab (:func:`shrink_in_slabs`), so that no float32 copy of
    the whole series is made (an int16 series of 2,000 slices is 1 GB, its float32 copy 2 GB).
    """
    image = reorient(image)
    extent = np.asarray(image.GetSpacing(), dtype=float) * np.asarray(image.GetSize())
    img = resample(shrink_in_slabs(image, spacing_mm), spacing_mm, extent_mm=extent)
    hu = clamp(sitk.GetArrayViewFromImage(img))
    mean, std = zscore_stats(hu)
    return Prepared(img, ((hu - mean) / std).astype(np.float32), (AIR_HU - mean) / std)
