"""Rasterisation of simple solids (oriented superellipsoids, tubes along polylines) on an LPS grid.

The renderer adds structures that no label map holds but every real scan shows (sacrum, iliac
wings, ribs, vessels, metal). They are described in patient millimetres by
:mod:`pipeline.synthesis.scene`, so that one description can be drawn on any grid or sub-grid
(a crop around one vertebra renders only its own box). Each solid is evaluated only inside its
own bounding box. Grids are axis-aligned (identity direction), as the posed grids are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """An axis-aligned grid: ``origin`` and ``spacing`` (x, y, z) and numpy ``shape`` (z, y, x)."""

    origin: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, img: sitk.Image) -> "Grid":
        d = np.array(img.GetDirection())
        if not np.allclose(d, np.eye(3).ravel(), atol=1e-6):
            raise ValueError("rendering needs an axis-aligned LPS grid (pose the labels first)")
        return cls(np.array(img.GetOrigin(), float), np.array(img.GetSpacing(), float),
                   tuple(int(v) for v in img.GetSize()[::-1]))

    def axis(self, k: int) -> np.ndarray:
        """Coordinates (mm) along x (0), y (1) or z (2)."""
        n = self.shape[2 - k]
        return self.origin[k] + self.spacing[k] * np.arange(n)

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Numpy box ``[z, y, x]`` of the voxels inside ``[lo_mm, hi_mm]``, or ``None``."""
        lo = np.ceil((np.asarray(lo_mm) - self.origin) / self.spacing).astype(int)
        hi = np.floor((np.asarray(hi_mm) - self.origin) / self.spacing).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.array(self.shape[::-1]))
        if np.any(hi <= lo):
            return None
        return slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])

    def points(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinate arrays ``(x [1,1,n], y [1,n,1], z [n,1,1])`` of ``box``."""
        z = self.axis(2)[box[0]][:, None, None]
        y = self.axis(1)[box[1]][None, :, None]
        x = self.axis(0)[box[2]][None, None, :]
        return x, y, z


@dataclass(frozen=True)
class Solid:
    """An oriented superellipsoid ``sum |x_i / r_i|^n <= 1`` (local axes = columns of ``axes``).

    Bone solids carry a cortical shell of ``cortex_mm`` (``inner_hu`` inside it); others are
    filled with ``hu``.
    """

    centre: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    exponent: float
    hu: float
    inner_hu: float | None = None
    cortex_mm: float = 0.0


@dataclass(frozen=True)
class Tube:
    """A tube of ``radius`` around a polyline (``points`` [n, 3], mm); shell as :class:`Solid`."""

    points: np.ndarray
    radius: float
    hu: float
    inner_hu: float | None = None
    cortex_mm: float = 0.0


def solid_values(grid: Grid, s: Solid) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """``(box, hu)`` of a :class:`Solid`: NaN outside it, ``hu`` in the shell, ``inner_hu``
    inside; ``None`` where it misses the grid."""
    ext = np.abs(s.axes) @ s.radii
    box = grid.box(s.centre - ext, s.centre + ext)
    if box is None:
        return None
    x, y, z = grid.points(box)
    rel = [x - s.centre[0], y - s.centre[1], z - s.centre[2]]
    loc = [rel[0] * s.axes[0, k] + rel[1] * s.axes[1, k] + rel[2] * s.axes[2, k]
           for k in range(3)]

    def level(radii: np.ndarray) -> np.ndarray:
        return sum(np.abs(loc[k] / max(radii[k], 1e-3)) ** s.exponent for k in range(3))

    out = np.where(level(s.radii) <= 1.0, np.float32(s.hu), np.float32(np.nan))
    if s.inner_hu is not None and s.cortex_mm > 0:
        inner = level(np.maximum(s.radii - s.cortex_mm, 0.5)) <= 1.0
        out = np.where(inner, np.float32(s.inner_hu), out)
    return box, out.astype(np.float32)


def tube_distance(grid: Grid, points: np.ndarray, radius: float
                  ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """``(box, distance)`` from every voxel of the tube's box to the polyline ``points``
    (resampled at <= 1 mm, so a chain of balls is a smooth tube); ``None`` off the grid."""
    pts = densify(points, 1.0)
    lo, hi = pts.min(axis=0) - radius - 1, pts.max(axis=0) + radius + 1
    box = grid.box(lo, hi)
    if box is None:
        return None
    shape = tuple(s.stop - s.start for s in box)
    dist = np.full(shape, np.inf, np.float32)
    x, y, z = grid.points(box)
    x, y, z = x.ravel(), y.ravel(), z.ravel()
    r1 = radius + 1.0
    for p in pts:
        iz = np.nonzero(np.abs(z - p[2]) <= r1)[0]
        iy = np.nonzero(np.abs(y - p[1]) <= r1)[0]
        ix = np.nonzero(np.abs(x - p[0]) <= r1)[0]
        if not (len(iz) and len(iy) and len(ix)):
            continue
        d = np.sqrt((z[iz, None, None] - p[2]) ** 2 + (y[None, iy, None] - p[1]) ** 2
                    + (x[None, None, ix] - p[0]) ** 2).astype(np.float32)
        sl = (slice(iz[0], iz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1))
        np.minimum(dist[sl], d, out=dist[sl])
    return box, dist


def tube_values(grid: Grid, t: Tube) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """``(box, hu)`` of a :class:`Tube` (NaN outside), as :func:`solid_values`."""
    got = tube_distance(grid, t.points, t.radius)
    if got is None:
        return None
    box, dist = got
    out = np.where(dist <= t.radius, np.float32(t.hu), np.float32(np.nan))
    if t.inner_hu is not None and t.cortex_mm > 0:
        out = np.where(dist <= t.radius - t.cortex_mm, np.float32(t.inner_hu), out)
    return box, out.astype(np.float32)


def values(grid: Grid, piece: Solid | Tube
           ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """``(box, hu)`` of a :class:`Solid` or a :class:`Tube`."""
    return solid_values(grid, piece) if isinstance(piece, Solid) else tube_values(grid, piece)


def densify(points: np.ndarray, step_mm: float) -> np.ndarray:
    """The polyline ``points`` resampled so that consecutive points are <= ``step_mm`` apart."""
    points = np.asarray(points, float)
    if len(points) < 2:
        return points
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(s[-1] / step_mm)) + 1)
    q = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(q, s, points[:, k]) for k in range(3)], axis=1)


def paint(vol: np.ndarray, got, protect: np.ndarray | None = None,
          record: np.ndarray | None = None) -> None:
    """Write the non-NaN values of ``got`` = ``(box, values)`` into ``vol`` (in place), except
    where ``protect`` is set; ``record`` (full shape, bool) is set where it wrote."""
    if got is None:
        return
    box, vals = got
    m = ~np.isnan(vals)
    if protect is not None:
        m &= ~protect[box]
    vol[box][m] = vals[m]
    if record is not None:
        record[box] |= m
