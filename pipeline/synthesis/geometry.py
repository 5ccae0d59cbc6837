"""Geometry of the vertebrae in a VerSe label map: centroids, local frames, vertebral bodies.

Posing, fracturing and rendering all need the same few facts about a vertebra: where it is, which
way the spine runs through it (its neighbours' centroids, not the image axes, since the spine is
curved and the volume may be rotated), which way is anterior, and which voxels are its body. They
live here once so that the fracture and the renderer agree on what "the body" is.

Coordinates are patient LPS millimetres (x left, y posterior, z superior), computed from each
image's own origin, spacing and direction, so any grid works. Arrays are numpy ``[z, y, x]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.levels import BY_LABEL

#: VerSe subregion labels of the vertebral body (49 corpus border, 50 corpus).
BODY_SUBREGIONS = (49, 50)
#: Subregion label given to the non-body part of a vertebra by :func:`pseudo_subregions`.
POSTERIOR_SUBREGION = 41
#: Half width (mm) of the mid-sagittal slab in which the spinal canal is looked for.
CANAL_SLAB_MM = 6.0
#: Share of the antero-posterior extent taken as body where no canal is found.
FALLBACK_BODY_SHARE = 0.42


def as_label_image(img: sitk.Image) -> sitk.Image:
    """``img`` as uint8 labels (float masks are rounded: some VerSe files store float64)."""
    if img.GetPixelID() == sitk.sitkUInt8:
        return img
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"label values {arr.min()}..{arr.max()} do not fit uint8")
    if np.issubdtype(arr.dtype, np.floating):
        img = sitk.Round(img)
    return sitk.Cast(img, sitk.sitkUInt8)


def on_grid_of(img: sitk.Image, ref: sitk.Image) -> sitk.Image:
    """Labels ``img`` on ``ref``'s grid: the same voxels where the headers differ by rounding
    only (subregion files are sometimes written with a slightly other origin), resampled with
    nearest-neighbour interpolation where the grids really differ."""
    img = as_label_image(img)
    close = (img.GetSize() == ref.GetSize()
             and np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-2)
             and np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3)
             and np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-3))
    if close:
        out = sitk.Image(img)
        out.CopyInformation(ref)
        return out
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def voxel_points(img: sitk.Image, zyx: tuple[np.ndarray, ...]) -> np.ndarray:
    """LPS mm ``[n, 3]`` of the voxels with numpy indices ``zyx`` (as ``np.nonzero`` gives)."""
    idx = np.stack([zyx[2], zyx[1], zyx[0]], axis=1).astype(np.float64)
    d = np.array(img.GetDirection()).reshape(3, 3)
    return np.array(img.GetOrigin()) + (idx * np.array(img.GetSpacing())) @ d.T


def grid_points(img: sitk.Image, box: tuple[slice, slice, slice]) -> np.ndarray:
    """LPS mm ``[nz, ny, nx, 3]`` of every voxel of the numpy box ``box`` of ``img``."""
    zz, yy, xx = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    pts = voxel_points(img, (zz.ravel(), yy.ravel(), xx.ravel()))
    return pts.reshape(zz.shape + (3,))


def label_centroids(img: sitk.Image) -> dict[int, np.ndarray]:
    """Centroid (LPS mm) of every non-zero label of ``img``."""
    f = sitk.LabelShapeStatisticsImageFilter()
    f.Execute(sitk.Cast(img, sitk.sitkUInt16))
    return {int(lab): np.array(f.GetCentroid(lab)) for lab in f.GetLabels()}


def level_sorted(labels) -> list[int]:
    """Vertebra labels in cranio-caudal order (T13 between T12 and L1, L6 after L5)."""
    labs = [int(v) for v in labels if int(v) in BY_LABEL]
    return sorted(labs, key=lambda v: BY_LABEL[v].order)


def spine_up(centroids: dict[int, np.ndarray], label: int) -> np.ndarray:
    """Unit vector along the spine at ``label``, pointing superior (cranial).

    From the centroids of the present neighbours in level order (the spine is curved and may be
    rotated, so the image z axis is not it); +z where the vertebra is alone.
    """
    order = level_sorted(centroids)
    k = order.index(label)
    above = centroids[order[k - 1]] if k > 0 else centroids[label]
    below = centroids[order[k + 1]] if k + 1 < len(order) else centroids[label]
    v = np.asarray(above, float) - np.asarray(below, float)
    n = np.linalg.norm(v)
    if n < 1e-6:
        return np.array([0.0, 0.0, 1.0])
    v = v / n
    return v if v[2] >= 0 else -v


@dataclass(frozen=True)
class VertebraFrame:
    """Local frame of one vertebra (LPS mm, unit vectors).

    Attributes:
        label: VerSe label.
        centre: centroid of the whole vertebra.
        up: along the spine, superior.
        anterior: perpendicular to ``up``, towards the patient's front (LPS -y projected).
        left: ``up x anterior``, the patient's left.
    """

    label: int
    centre: np.ndarray
    up: np.ndarray
    anterior: np.ndarray
    left: np.ndarray

    def local(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(t, a, w)``: coordinates of ``pts`` ``[..., 3]`` along up, anterior and left."""
        rel = pts - self.centre
        return rel @ self.up, rel @ self.anterior, rel @ self.left


def vertebra_frame(centroids: dict[int, np.ndarray], label: int) -> VertebraFrame:
    """The :class:`VertebraFrame` of ``label`` from the centroids of a label map."""
    up = spine_up(centroids, label)
    ant = np.array([0.0, -1.0, 0.0])
    ant = ant - (ant @ up) * up
    if np.linalg.norm(ant) < 1e-6:
        raise ValueError(f"label {label}: spine axis along the antero-posterior axis")
    ant /= np.linalg.norm(ant)
    return VertebraFrame(int(label), np.asarray(centroids[label], float), up, ant,
                         np.cross(up, ant))


def label_boxes(arr: np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    """Numpy bounding box of every non-zero label of an integer array."""
    return {i + 1: box for i, box in enumerate(ndi.find_objects(arr)) if box is not None}


def body_boundary(a: np.ndarray, w: np.ndarray) -> float:
    """Anterior coordinate of the posterior wall of the body, from the vertebra's voxels.

    In the mid-sagittal slab the body and the posterior arch are separated by the spinal canal:
    walking from the most anterior voxel backwards, the first empty run of >= 3 mm after >= 8 mm
    of bone is the canal, and its anterior edge is the body's posterior wall. Where no such gap
    exists (a partial mask, C1), the anterior :data:`FALLBACK_BODY_SHARE` is taken.
    """
    a_min, a_max = float(a.min()), float(a.max())
    fallback = a_max - FALLBACK_BODY_SHARE * (a_max - a_min)
    mid = np.abs(w - np.median(w)) < CANAL_SLAB_MM
    if mid.sum() < 20:
        return fallback
    edges = np.arange(a_max + 1.0, a_min - 1.0, -1.0)[::-1]
    counts, _ = np.histogram(a[mid], bins=edges)
    counts = counts[::-1]                       # from anterior to posterior, 1 mm bins
    full = counts > 0.02 * counts.max()
    start = int(np.argmax(full))
    run = 0
    for k in range(start, len(full)):
        if full[k]:
            run = 0
            continue
        run += 1
        if run >= 3 and k - run + 1 - start >= 8:
            return float(a_max + 1.0 - (k - run + 1))
    return fallback


def approximate_body(labels: np.ndarray, img: sitk.Image, label: int, frame: VertebraFrame,
                     box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """Boolean mask (same shape as ``box`` of ``labels``) of the body of ``label``: the part of
    the vertebra anterior of the spinal canal (:func:`body_boundary`)."""
    box = box if box is not None else label_boxes(labels)[label]
    vert = labels[box] == label
    zyx = np.nonzero(vert)
    pts = voxel_points(img, tuple(i + s.start for i, s in zip(zyx, box)))
    _, a, w = frame.local(pts)
    keep = a >= body_boundary(a, w)
    out = np.zeros_like(vert)
    out[tuple(i[keep] for i in zyx)] = True
    return out


def pseudo_subregions(labels: sitk.Image, subregions: sitk.Image | None = None) -> sitk.Image:
    """A subregion map for every vertebra of ``labels``: the real one (``subregions``, same
    grid) where it marks at least a tenth of the vertebra as body, elsewhere 50 (corpus) on the
    approximated body and 41 on the rest. Fracturing and rendering then treat real and
    approximated bodies alike (real subregion masks miss levels now and then)."""
    arr = sitk.GetArrayFromImage(labels)
    out = np.zeros(arr.shape, np.uint8)
    if subregions is not None:
        real = sitk.GetArrayFromImage(as_label_image(subregions))
        out[arr > 0] = np.where(real[arr > 0] > 0, real[arr > 0], POSTERIOR_SUBREGION)
    else:
        out[arr > 0] = POSTERIOR_SUBREGION
    cents = label_centroids(labels)
    boxes = label_boxes(arr)
    for lab in level_sorted(cents):
        box = boxes[lab]
        vert = arr[box] == lab
        if np.isin(out[box][vert], BODY_SUBREGIONS).sum() >= 0.1 * vert.sum():
            continue
        body = approximate_body(arr, labels, lab, vertebra_frame(cents, lab), box)
        region = out[box]
        region[vert] = POSTERIOR_SUBREGION
        region[body] = BODY_SUBREGIONS[1]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(labels)
    return img


def body_masks(labels: np.ndarray, subregions: np.ndarray) -> np.ndarray:
    """Boolean mask of all vertebral bodies (labelled vertebra voxels with a body subregion)."""
    return (labels > 0) & np.isin(subregions, BODY_SUBREGIONS)
