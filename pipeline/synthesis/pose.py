"""Random spatial augmentation of a VerSe label map onto a 1 mm LPS grid.

Real masks come in every orientation (PIR, LPS, PSR, ...) and spacing (0.3 to 3 mm). Each is
resampled once, with nearest-neighbour interpolation (labels must stay labels), onto an
axis-aligned LPS grid that covers the labelled spine plus a margin of background, through one
composite SimpleITK transform:

- a rotation (each Euler angle within +-15 deg) and an anisotropic scale (0.85-1.15 per axis)
  about the spine's centre: patients lie tilted and their vertebrae differ in size and shape;
- a low-frequency B-spline displacement (a few control points, more along the spine): the
  curvature (lordosis, kyphosis, scoliosis) differs between patients and positions, and a
  B-spline this coarse bends the column without distorting a single vertebra;
- a random field of view along z, so that scans start and end anywhere, cutting vertebrae as
  real scans do.

The transform maps output points to source points (SimpleITK's convention for resampling), so
the anatomy appears with the inverse of the drawn affine; the drawn numbers are the anatomy's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from pipeline.synthesis.geometry import as_label_image, on_grid_of

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Lattice of the sampled transform (mm) and the code base of label * base + subregion.
FIELD_SPACING_MM = 4.0
SUB_CODE = 64


@dataclass(frozen=True)
class PoseOptions:
    """Ranges of the random pose.

    Attributes:
        spacing_mm: output grid spacing (isotropic).
        rotation_deg: largest absolute Euler angle about each axis.
        scale_range: per-axis anatomical scale factor range.
        elastic_sigma_mm: standard deviation of the B-spline control point displacements
            (x, y, z); z smaller, since the column's length varies less than its curvature.
        elastic_mesh: B-spline mesh size (x, y, z): few nodes = low frequency bending only.
        margin_mm: background kept around the labels' bounding box (x, y, z); x/y large enough
            for a 144 mm segmentation crop around any vertebra.
        fov_probability: chance that the z range is cut at random.
        min_fov_mm: shortest z range a cut keeps.
    """

    spacing_mm: float = 1.0
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_sigma_mm: tuple[float, float, float] = (4.0, 4.0, 2.0)
    elastic_mesh: tuple[int, int, int] = (2, 2, 4)
    margin_mm: tuple[float, float, float] = (75.0, 75.0, 10.0)
    fov_probability: float = 0.7
    min_fov_mm: float = 60.0


#: No randomness at all: only the resampling onto the LPS grid.
IDENTITY_POSE = PoseOptions(rotation_deg=0.0, scale_range=(1.0, 1.0),
                            elastic_sigma_mm=(0.0, 0.0, 0.0), fov_probability=0.0)


@dataclass
class PosedLabels:
    """A label map (and its subregions) on the posed grid.

    Attributes:
        labels: uint8 VerSe labels on an LPS grid of ``spacing_mm``.
        subregions: uint8 subregion labels on the same grid, where given.
        transform: maps points of the posed grid to points of the source image.
        rotation_deg: the anatomy's Euler angles (x, y, z).
        scale: the anatomy's scale factors (x, y, z).
        z_range_mm: the z range kept by the field-of-view cut, or ``None``.
    """

    labels: sitk.Image
    subregions: sitk.Image | None
    transform: sitk.Transform
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    z_range_mm: tuple[float, float] | None = field(default=None)


def physical_corners(img: sitk.Image, lo_xyz, hi_xyz) -> np.ndarray:
    """The 8 corners (LPS mm) of the index box ``[lo, hi]`` (inclusive) of ``img``."""
    out = []
    for cx in (lo_xyz[0], hi_xyz[0]):
        for cy in (lo_xyz[1], hi_xyz[1]):
            for cz in (lo_xyz[2], hi_xyz[2]):
                out.append(img.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy),
                                                                        float(cz))))
    return np.array(out)


def label_corners(labels: sitk.Image) -> np.ndarray:
    """Corners (LPS mm) of the bounding box of all non-zero voxels (half a voxel outside)."""
    f = sitk.LabelShapeStatisticsImageFilter()
    f.Execute(sitk.Cast(labels > 0, sitk.sitkUInt8))
    if 1 not in f.GetLabels():
        raise ValueError("the label map is empty")
    bb = f.GetBoundingBox(1)
    lo = np.array(bb[:3], float) - 0.5
    hi = lo + np.array(bb[3:], float)
    return physical_corners(labels, lo, hi)


def lps_grid(lo_mm: np.ndarray, hi_mm: np.ndarray, spacing_mm: float) -> sitk.Image:
    """An empty uint8 LPS image of ``spacing_mm`` covering ``[lo_mm, hi_mm]``."""
    lo = np.floor(np.asarray(lo_mm) / spacing_mm) * spacing_mm
    size = np.ceil((np.asarray(hi_mm) - lo) / spacing_mm).astype(int) + 1
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetOrigin([float(v) for v in lo])
    ref.SetDirection(LPS)
    return ref


def rotation_matrix(angles_deg) -> np.ndarray:
    """``Rz @ Ry @ Rx`` of Euler angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def resample_labels(img: sitk.Image, ref: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Nearest-neighbour resampling of a uint8 label image onto ``ref`` (0 outside)."""
    return sitk.Resample(as_label_image(img), ref, transform, sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


def to_lps_grid(labels: sitk.Image, subregions: sitk.Image | None = None,
                spacing_mm: float = 1.0,
                margin_mm: tuple[float, float, float] = (10.0, 10.0, 10.0)) -> PosedLabels:
    """The label map (and subregions) on an LPS grid of ``spacing_mm`` around its labels, with no
    random change: the common frame for fracturing before the random pose."""
    return random_pose(labels, np.random.default_rng(0), subregions,
                       PoseOptions(spacing_mm=spacing_mm, rotation_deg=0.0,
                                   scale_range=(1.0, 1.0), elastic_sigma_mm=(0.0, 0.0, 0.0),
                                   margin_mm=margin_mm, fov_probability=0.0))


def dense_transform(transform: sitk.Transform, ref: sitk.Image, spacing_mm: float
                    ) -> sitk.Transform:
    """``transform`` sampled as a displacement field on a ``spacing_mm`` lattice covering
    ``ref`` (plus one node beyond each side): a smooth transform, cheap to evaluate."""
    size = np.array(ref.GetSize())
    sp = np.array(ref.GetSpacing())
    n = np.ceil((size - 1) * sp / spacing_mm).astype(int) + 3
    origin = np.array(ref.GetOrigin()) - spacing_mm
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64,
                                              [int(v) for v in n], [float(v) for v in origin],
                                              [float(spacing_mm)] * 3, ref.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


def _check_sub(subregions: sitk.Image) -> sitk.Image:
    sub = as_label_image(subregions)
    if sitk.GetArrayViewFromImage(sub).max() >= SUB_CODE:
        raise ValueError(f"subregion labels must be below {SUB_CODE}")
    return sub


def _pad_to(img: sitk.Image, ref: sitk.Image) -> sitk.Image:
    """``img`` (on a sub-grid of ``ref`` with the same spacing) placed into an empty ``ref``."""
    idx = ref.TransformPhysicalPointToIndex(img.GetOrigin())
    out = sitk.Image(ref.GetSize(), img.GetPixelID())
    out.CopyInformation(ref)
    lo = np.maximum(np.array(idx), 0)
    hi = np.minimum(np.array(idx) + np.array(img.GetSize()), np.array(ref.GetSize()))
    src_lo = lo - np.array(idx)
    return sitk.Paste(out, img, [int(v) for v in hi - lo], [int(v) for v in src_lo],
                      [int(v) for v in lo])


def _fov_cut(labels: sitk.Image, rng: np.random.Generator, options: PoseOptions,
             keep: Sequence[int] = ()) -> tuple[int, int] | None:
    """Index range ``[k0, k1)`` along z kept by a random field-of-view cut (that never cuts
    the labels ``keep``), or ``None``."""
    if options.fov_probability <= 0 or rng.random() >= options.fov_probability:
        return None
    arr = sitk.GetArrayViewFromImage(labels)
    zs = np.nonzero(arr.reshape(arr.shape[0], -1).any(axis=1))[0]
    sp = labels.GetSpacing()[2]
    need = int(np.ceil(options.min_fov_mm / sp))
    first, last = int(zs[0]), int(zs[-1]) + 1
    if last - first <= need:
        return None
    lo_max, hi_min = last - need, first + need
    kept = np.nonzero(np.isin(arr, list(keep)).reshape(arr.shape[0], -1).any(axis=1))[0]
    if len(kept):
        lo_max, hi_min = min(lo_max, int(kept[0])), max(hi_min, int(kept[-1]) + 1)
    k0 = int(rng.integers(first, lo_max + 1))
    k1 = int(rng.integers(max(k0 + need, hi_min), last + 1))
    pad = int(round(options.margin_mm[2] / sp))
    return max(0, k0 - pad), min(arr.shape[0], k1 + pad)


def random_pose(labels: sitk.Image, rng: np.random.Generator,
                subregions: sitk.Image | None = None,
                options: PoseOptions = PoseOptions(), keep: Sequence[int] = ()) -> PosedLabels:
    """``labels`` (any orientation and spacing) rotated, scaled, bent and cut at random onto a
    1 mm (``options.spacing_mm``) LPS grid. ``subregions`` (on the same source grid as
    ``labels``) follows the same transform; the field-of-view cut never cuts the labels
    ``keep``."""
    labels = as_label_image(labels)
    if subregions is not None:
        subregions = on_grid_of(subregions, labels)
    corners = label_corners(labels)
    centre = corners.mean(axis=0)
    angles = rng.uniform(-options.rotation_deg, options.rotation_deg, 3)
    scale = rng.uniform(*options.scale_range, 3)
    forward = rotation_matrix(angles) @ np.diag(scale)          # anatomy: source -> posed
    affine = sitk.AffineTransform(3)
    affine.SetCenter([float(c) for c in centre])
    affine.SetMatrix([float(v) for v in np.linalg.inv(forward).ravel()])   # posed -> source

    posed_corners = centre + (corners - centre) @ forward.T
    sigma = np.asarray(options.elastic_sigma_mm, float)
    pad = np.asarray(options.margin_mm, float) + 4.0 * sigma
    ref = lps_grid(posed_corners.min(axis=0) - pad, posed_corners.max(axis=0) + pad,
                   options.spacing_mm)

    transform = sitk.CompositeTransform(3)
    transform.AddTransform(affine)
    if sigma.any():
        # defined a little beyond the grid: outside its domain a B-spline does not displace,
        # and the sampled field must not see that edge
        domain = lps_grid(np.array(ref.GetOrigin()) - 10.0,
                          np.array(ref.TransformIndexToPhysicalPoint(
                              [int(v) - 1 for v in ref.GetSize()])) + 10.0, 4.0)
        bspline = sitk.BSplineTransformInitializer(domain, [int(m) for m in options.elastic_mesh],
                                                   3)
        n = len(bspline.GetParameters()) // 3
        disp = rng.normal(0.0, 1.0, (3, n)) * sigma[:, None]    # parameters are x..., y..., z...
        bspline.SetParameters([float(v) for v in disp.ravel()])
        transform.AddTransform(bspline)   # applied first: bending in the posed frame

    # Only the box that can hold labels is resampled (the margin is most of the grid, all
    # background), then padded to the grid. The composite transform is sampled once as a
    # displacement field on a 4 mm lattice (the B-spline costs ~1 us a voxel; trilinear
    # interpolation of a field this smooth is exact to a hundredth of a millimetre), and labels
    # and subregions travel together as one code (label * 64 + subregion): one resampling.
    core = lps_grid(posed_corners.min(axis=0) - 4.0 * sigma - 2.0,
                    posed_corners.max(axis=0) + 4.0 * sigma + 2.0, options.spacing_mm)
    fast = dense_transform(transform, core, FIELD_SPACING_MM)
    code = sitk.Cast(labels, sitk.sitkUInt16)
    if subregions is not None:
        code = code * SUB_CODE + sitk.Cast(_check_sub(subregions), sitk.sitkUInt16)
    moved = sitk.Resample(code, core, fast, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    arr = sitk.GetArrayFromImage(moved)
    if subregions is None:
        return _finish(_pad_to(_like(arr.astype(np.uint8), core), ref), None, transform,
                       angles, scale, rng, options, keep)
    out = _pad_to(_like((arr // SUB_CODE).astype(np.uint8), core), ref)
    sub = _pad_to(_like((arr % SUB_CODE).astype(np.uint8), core), ref)
    return _finish(out, sub, transform, angles, scale, rng, options, keep)


def _finish(out: sitk.Image, sub: sitk.Image | None, transform: sitk.Transform, angles, scale,
            rng: np.random.Generator, options: PoseOptions, keep: Sequence[int]) -> PosedLabels:
    """The field-of-view cut and the result."""
    cut = _fov_cut(out, rng, options, keep)
    z_range = None
    if cut is not None:
        k0, k1 = cut
        size = list(out.GetSize())
        size[2] = k1 - k0
        out = sitk.RegionOfInterest(out, size, [0, 0, k0])
        if sub is not None:
            sub = sitk.RegionOfInterest(sub, size, [0, 0, k0])
        z_range = (out.GetOrigin()[2], out.GetOrigin()[2] + (size[2] - 1) * out.GetSpacing()[2])
    return PosedLabels(out, sub, transform, tuple(float(a) for a in angles),
                       tuple(float(s) for s in scale), z_range)
