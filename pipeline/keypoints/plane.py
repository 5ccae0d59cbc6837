"""The mid-sagittal plane of one vertebra as a 2D grid (paper eq. 14).

The paper takes the sagittal slice through the centroid. A patient-aligned slice (``x =
centroid x``) cuts a vertebra of a scoliotic or kyphotic spine obliquely and lengthens every
height by ``1 / cos(tilt)``; so the plane here is spanned by the spine's local cranio-caudal axis
``up`` (from the neighbouring centroids, :func:`spine_axes`) and the posterior direction
orthogonalised against it: the vertebra's own mid-sagittal plane up to its axial rotation.

Its 2D array is indexed ``[row, col]``: rows follow ``up`` (inferior -> superior), columns the
posterior direction (anterior -> posterior), both at ``spacing_mm``. :meth:`SagittalPlane.to_mm`
and :meth:`~SagittalPlane.to_px` convert between pixel (row, col) and LPS millimetres.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: Plane of the shipped model: 96 x 96 pixels of 0.75 mm (72 mm, a lumbar body with margin).
PLANE_SIZE = 96
PLANE_SPACING_MM = 0.75
#: Neighbouring centroids further apart than this do not define the spine axis (mm).
MAX_NEIGHBOUR_MM = 60.0


@dataclass(frozen=True)
class SagittalPlane:
    centre_mm: tuple[float, float, float]
    row_axis: tuple[float, float, float] = (0.0, 0.0, 1.0)
    col_axis: tuple[float, float, float] = (0.0, 1.0, 0.0)
    size: int = PLANE_SIZE
    spacing_mm: float = PLANE_SPACING_MM

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the plane (``col x row``: the patient's left-right axis up to the tilt)."""
        return np.cross(np.array(self.col_axis), np.array(self.row_axis))

    def shifted(self, offset_mm: float) -> "SagittalPlane":
        """The parallel plane ``offset_mm`` along :attr:`normal` (same axes, size and spacing)."""
        centre = np.array(self.centre_mm, float) + offset_mm * self.normal
        return dataclasses.replace(self, centre_mm=tuple(float(v) for v in centre))

    def reference(self) -> sitk.Image:
        """A 3D image one voxel thick whose array is ``[row, col, 0]``."""
        row, col = np.array(self.row_axis), np.array(self.col_axis)
        normal = self.normal
        n, s = self.size, self.spacing_mm
        ref = sitk.Image([1, n, n], sitk.sitkUInt8)
        ref.SetSpacing([1.0, s, s])
        # image index axes: i -> normal, j -> col, k -> row
        ref.SetDirection(np.stack([normal, col, row], axis=1).ravel().tolist())
        origin = np.array(self.centre_mm, float) - (n - 1) / 2.0 * s * (col + row)
        ref.SetOrigin(origin.tolist())
        return ref

    def sample(self, image: sitk.Image, linear: bool = True, default: float = 0.0) -> np.ndarray:
        """``image`` on the plane, ``[row, col]`` float32."""
        interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
        out = sitk.Resample(image, self.reference(), sitk.Transform(), interp, float(default),
                            sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)[:, :, 0]

    def to_mm(self, rc: Sequence[float]) -> tuple[float, float, float]:
        n, s = self.size, self.spacing_mm
        p = np.array(self.centre_mm, float) + (rc[0] - (n - 1) / 2.0) * s * np.array(self.row_axis) \
            + (rc[1] - (n - 1) / 2.0) * s * np.array(self.col_axis)
        return tuple(float(v) for v in p)

    def to_px(self, p_mm: Sequence[float]) -> tuple[float, float]:
        n, s = self.size, self.spacing_mm
        d = np.array(p_mm, float) - np.array(self.centre_mm, float)
        return (float(d @ np.array(self.row_axis) / s + (n - 1) / 2.0),
                float(d @ np.array(self.col_axis) / s + (n - 1) / 2.0))


def plane_axes(up: Sequence[float] = (0.0, 0.0, 1.0), angle_deg: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Row (``up``, turned by ``angle_deg`` within the plane) and column (posterior) axes."""
    u = np.asarray(up, float)
    u = u / np.linalg.norm(u)
    p = np.array([0.0, 1.0, 0.0]) - u[1] * u
    if np.linalg.norm(p) < 1e-6:
        p = np.array([0.0, 0.0, -1.0]) - u[2] * u
    p /= np.linalg.norm(p)
    if angle_deg:
        a = math.radians(angle_deg)
        u, p = math.cos(a) * u + math.sin(a) * p, -math.sin(a) * u + math.cos(a) * p
    return u, p


def sagittal_plane(centre_mm: Sequence[float], up: Sequence[float] = (0.0, 0.0, 1.0),
                   size: int = PLANE_SIZE, spacing_mm: float = PLANE_SPACING_MM,
                   angle_deg: float = 0.0) -> SagittalPlane:
    u, p = plane_axes(up, angle_deg)
    return SagittalPlane(tuple(float(v) for v in centre_mm), tuple(u.tolist()), tuple(p.tolist()),
                         size, spacing_mm)


def spine_axes(orders: Sequence[int], centroids_mm: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """The spine's local cranio-caudal axis (unit, pointing superior) at each vertebra.

    From the chord between the cranial and caudal neighbours (levels adjacent in ``orders`` and
    closer than :data:`MAX_NEIGHBOUR_MM`), one-sided at the ends; +z without neighbours.
    """
    c = [np.asarray(v, float) for v in centroids_mm]
    by_order = {int(o): i for i, o in enumerate(orders)}
    out = []
    for i, o in enumerate(orders):
        up_i = by_order.get(int(o) - 1)
        dn_i = by_order.get(int(o) + 1)
        a = c[up_i] if up_i is not None and np.linalg.norm(c[up_i] - c[i]) < MAX_NEIGHBOUR_MM else c[i]
        b = c[dn_i] if dn_i is not None and np.linalg.norm(c[dn_i] - c[i]) < MAX_NEIGHBOUR_MM else c[i]
        d = a - b
        if np.linalg.norm(d) < 1e-6 or d[2] <= 0:
            out.append(np.array([0.0, 0.0, 1.0]))
        else:
            out.append(d / np.linalg.norm(d))
    return out


def body_centre(fg_image: sitk.Image, centroid_mm: Sequence[float], up: Sequence[float] = (0, 0, 1),
                threshold: float = 0.5, field_mm: float = 96.0, spacing_mm: float = 1.0
                ) -> tuple[float, float, float]:
    """Centre of the vertebral body on the mid-sagittal plane of a foreground map.

    The body is the most anterior of the large connected parts of the thresholded plane (the
    canal separates it from the posterior elements, and a thoracic spinous process can be the
    larger part of the mid-sagittal slice). Falls back to the centroid when nothing is found.
    """
    n = int(round(field_mm / spacing_mm))
    plane = sagittal_plane(centroid_mm, up, n, spacing_mm)
    rc = body_component_centre(plane.sample(fg_image) > threshold)
    if rc is None:
        return tuple(float(v) for v in centroid_mm)
    return plane.to_mm(rc)


def body_mask(mask_rc: np.ndarray, min_share: float = 0.3) -> np.ndarray | None:
    """The vertebral body in a mid-sagittal mask (rows up the spine, columns anterior -> posterior):
    of the connected parts at least ``min_share`` as large as the largest, the most anterior."""
    from scipy import ndimage

    lab, k = ndimage.label(mask_rc)
    if k == 0:
        return None
    sizes = ndimage.sum(mask_rc, lab, index=np.arange(1, k + 1))
    cols = ndimage.mean(np.broadcast_to(np.arange(mask_rc.shape[1]), mask_rc.shape), lab,
                        index=np.arange(1, k + 1))
    big = [i for i in range(k) if sizes[i] >= min_share * sizes.max()]
    best = min(big, key=lambda i: cols[i])
    return lab == best + 1


def body_component_centre(mask_rc: np.ndarray) -> tuple[float, float] | None:
    body = body_mask(mask_rc)
    if body is None:
        return None
    rr, cc = np.nonzero(body)
    return float(rr.mean()), float(cc.mean())
