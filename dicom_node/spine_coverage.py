"""Is there a spine in view? A cheap look at a few slices of a stable series, so that a head
CT or an extremity CT is skipped (``no spine in view``) before any job is queued (issue 27).

Where a radiologist finds the spine on an axial image: bone on the body's left-right midline,
deep inside the body (not the skull under the scalp), and not in front of the body's centre
(not the sternum). Per sampled slice, in patient coordinates (so every patient position,
HFS/FFS/HFP/FFP, looks the same):

1. body = tissue denser than ``BODY_HU`` (air and lung out), holes filled (lungs, bowel gas in),
   components of at least ``MIN_PART_FRACTION`` of the largest (two legs stay two: their
   centre falls between them, in air); the image border is not the skin (a small field of view
   reconstructed around the spine is all body);
2. spine-like bone = ``BONE_HU`` or more (3 x 3 pixel mean), at least ``MIN_DEPTH_MM`` from
   the skin, within ``max(MIDLINE_MM, MIDLINE_FRACTION x body width)`` of the body's centre in
   x and not more than ``max(ANTERIOR_MM, ANTERIOR_FRACTION x body depth)`` in front of it in
   y, of at least ``MIN_BONE_MM2`` in all; bone that encloses more than ``SHELL_MM2`` (a
   skull: the brain inside a ring of bone; the vertebral canal and a body's marrow are far
   smaller) does not count.

Tuned on: the phantoms (cervical to lumbar, all four patient positions: 8-9 of 9 sampled
slices), the shared pack's real CT (cropped to the spine, or a whole chest: 8-9 of 9), a
synthetic head (1 of 9: the vertex cap) and both thighs (0 of 9)
(tests/dicom_node/test_spine_coverage.py). A single limb alone in the middle of the field
can pass (a long bone there looks like a neck's spine).

The series holds a spine when ``min_fraction`` of the sampled slices do. Pure: slices in,
:class:`SpineCoverage` out; :func:`read_spine_coverage` reads the sampled files.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

#: Soft tissue and fat are above this; air and aerated lung below (HU).
BODY_HU = -400.0
#: Cortical and most trabecular vertebral bone is above this after a 3 x 3 pixel mean (noise
#: down by three); muscle, blood, contrast-free organs below (HU).
BONE_HU = 150.0
#: Spine-like bone lies at least this deep under the skin (the skull lies 3-10 mm under it).
MIN_DEPTH_MM = 15.0
#: Half-width of the midline band: this, or this fraction of the body's width if more.
MIDLINE_MM = 25.0
MIDLINE_FRACTION = 0.1
#: Spine-like bone may lie this far, or this fraction of the body's depth, anterior of the
#: body's centre (the neck's vertebral bodies lie in front of it; the sternum much further).
ANTERIOR_MM = 20.0
ANTERIOR_FRACTION = 0.3
#: At least this much spine-like bone in one slice (a lamina at a disc level: ~100 mm^2).
MIN_BONE_MM2 = 60.0
#: Bone enclosing a hole this large is a shell (the skull cut across), not a vertebra (mm^2).
SHELL_MM2 = 2500.0
#: A body part smaller than this fraction of the largest (an arm beside the trunk) is ignored.
MIN_PART_FRACTION = 0.25
#: The check reads slices at about this pixel size (mm), striding finer images.
WORK_PIXEL_MM = 1.0
#: A slice normal further than this from the patient's z axis: not checked (not axial).
MAX_TILT_DEG = 45.0


@dataclass(frozen=True)
class SpineCoverage:
    """The verdict: ``in_view``; ``checked`` slices read, ``with_spine`` of them spine-like;
    ``detail`` says so for a reason (no patient identifier)."""

    in_view: bool
    checked: int
    with_spine: int
    detail: str


@dataclass(frozen=True)
class AxialSlice:
    """One slice in HU with the patient x and y (LPS, mm) of its pixel rows and columns.

    ``x_mm``/``y_mm`` have the image's shape; ``pixel_mm``: (row, column) spacing."""

    hu: np.ndarray
    x_mm: np.ndarray
    y_mm: np.ndarray
    pixel_mm: tuple[float, float]


def slice_spine_bone_mm2(s: AxialSlice) -> float:
    """The area (mm^2) of spine-like bone in one axial slice (module docstring)."""
    tissue = s.hu > BODY_HU
    labels, n = ndimage.label(tissue)
    if n == 0:
        return 0.0
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_PART_FRACTION * sizes.max()) + 1
    body = ndimage.binary_fill_holes(np.isin(labels, keep))
    if body.all():
        depth = np.full(body.shape, np.inf)
    else:
        depth = ndimage.distance_transform_edt(body, sampling=s.pixel_mm)
    x, y = s.x_mm[body], s.y_mm[body]
    xc, yc = float(x.mean()), float(y.mean())
    (x_lo, y_lo), (x_hi, y_hi) = np.percentile(np.stack([x, y], 1), [2, 98], axis=0)
    band = max(MIDLINE_MM, MIDLINE_FRACTION * float(x_hi - x_lo))
    front = max(ANTERIOR_MM, ANTERIOR_FRACTION * float(y_hi - y_lo))
    bone = _not_shell(ndimage.uniform_filter(s.hu, 3) >= BONE_HU,
                      s.pixel_mm[0] * s.pixel_mm[1]) & (depth >= MIN_DEPTH_MM) & \
        (np.abs(s.x_mm - xc) <= band) & (s.y_mm >= yc - front)
    return float(bone.sum()) * s.pixel_mm[0] * s.pixel_mm[1]


def _not_shell(bone: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """``bone`` without the pieces that enclose a hole of ``SHELL_MM2`` or more."""
    holes, n = ndimage.label(ndimage.binary_fill_holes(bone) & ~bone)
    if n == 0:
        return bone
    big = np.flatnonzero(np.bincount(holes.ravel())[1:] * pixel_mm2 >= SHELL_MM2) + 1
    if big.size == 0:
        return bone
    pieces, _ = ndimage.label(bone)
    rims = np.unique(pieces[ndimage.binary_dilation(np.isin(holes, big)) & bone])
    return bone & ~np.isin(pieces, rims[rims > 0])


def spine_coverage(slices: Sequence[AxialSlice], min_fraction: float) -> SpineCoverage:
    """The verdict over the sampled slices of a series."""
    if not slices:
        return SpineCoverage(False, 0, 0, "no slice could be read")
    found = sum(slice_spine_bone_mm2(s) >= MIN_BONE_MM2 for s in slices)
    in_view = found >= min_fraction * len(slices)
    return SpineCoverage(in_view, len(slices), found,
                         f"vertebra-like bone (deep in the body, on its midline) in {found} "
                         f"of {len(slices)} sampled slices (at least {min_fraction:.0%} needed)")


def sample_indices(count: int, samples: int) -> list[int]:
    """``samples`` indices spread evenly over ``count`` items, the ends left out (the first
    and last slice of a spine series often hold a disc or the field's edge)."""
    if count <= samples:
        return list(range(count))
    return [round((k + 0.5) * count / samples - 0.5) for k in range(samples)]


def axial_slice(ds: pydicom.Dataset) -> AxialSlice | None:
    """The slice of a classic single-frame CT image, at about ``WORK_PIXEL_MM``; None where
    it is not a near-axial single-frame image with geometry (the check then does not apply)."""
    try:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return None
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
        spacing = [float(v) for v in ds.PixelSpacing]
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,) or len(spacing) != 2:
        return None
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-6 or \
            abs(normal[2]) / np.linalg.norm(normal) < np.cos(np.radians(MAX_TILT_DEG)):
        return None
    stride = [max(1, int(WORK_PIXEL_MM / sp)) if sp > 0 else 1 for sp in spacing]
    pixels = ds.pixel_array[::stride[0], ::stride[1]].astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = pixels * slope + intercept
    # PS3.3 C.7.6.2.1.1: P(r, c) = S + c * dc * row + r * dr * col (r: row index).
    r = np.arange(hu.shape[0])[:, None] * spacing[0] * stride[0]
    c = np.arange(hu.shape[1])[None, :] * spacing[1] * stride[1]
    x = position[0] + c * row[0] + r * col[0]
    y = position[1] + c * row[1] + r * col[1]
    return AxialSlice(hu, x, y, (spacing[0] * stride[0], spacing[1] * stride[1]))


def read_spine_coverage(paths: Sequence[Path], samples: int,
                        min_fraction: float) -> SpineCoverage | None:
    """The verdict for the series whose instance files are ``paths``, reading ``samples`` of
    them spread over the series. None where the check does not apply (multi-frame or
    non-axial images: the other rules decide alone)."""
    slices = []
    for i in sample_indices(len(paths), samples):
        s = axial_slice(pydicom.dcmread(paths[i]))
        if s is None:
            return None
        slices.append(s)
    return spine_coverage(slices, min_fraction)
