"""Reference Genant points from an expert vertebra mask's mid-sagittal section.

Real scans carry no keypoint annotations, only voxel masks. The six points are placed on the
vertebral BODY of the mask's section the way the phantom places its own
(:meth:`pipeline.phantom.anatomy.Vertebra.keypoints_local`) and the way
:func:`pipeline.genant.heights_from_mask` measures: at ``-edge``, 0 and ``+edge`` of the body's
half depth from its centre (``edge`` = :data:`pipeline.genant.MASK_EDGE_FRACTION`), on the body's
upper and lower boundary in that column. They serve to measure the keypoint network and the
mask heights on real CT, and as training targets.

The body is, where VerSe subregion labels exist, the voxels labelled
:data:`BODY_SUBREGIONS`; else the most anterior large connected part of the section
(:func:`pipeline.keypoints.plane.body_mask`: the canal separates it from the posterior elements).
Rows run inferior -> superior, columns anterior -> posterior (:mod:`pipeline.keypoints.plane`).
"""
from __future__ import annotations

import numpy as np

from pipeline.findings import KEYPOINT_NAMES, Heights

#: Where the anterior and posterior heights are measured on the mask: this fraction of the body's
#: half depth in front of and behind its centre, near the corners where Genant measures (the
#: phantom's keypoints sit at the same fraction).
MASK_EDGE_FRACTION = 0.88

#: VerSe subregion labels of the vertebral body (49 the body's cortex/endplates, 50 the body).
BODY_SUBREGIONS = (49, 50)
#: A section whose body is smaller than this (pixels) gives no points.
MIN_BODY_PIXELS = 20


def body_section(mask_rc: np.ndarray, subregions_rc: np.ndarray | None = None
                 ) -> np.ndarray | None:
    """The vertebral body of a mid-sagittal mask section (bool ``[row, col]``), holes filled;
    ``None`` when none is found. With ``subregions_rc`` (VerSe 41-50 on the same plane) the body
    is its largest connected part labelled :data:`BODY_SUBREGIONS` inside the mask."""
    from scipy import ndimage

    from pipeline.keypoints.plane import body_mask

    m = np.asarray(mask_rc, bool)
    if subregions_rc is not None and np.isin(subregions_rc, BODY_SUBREGIONS).any():
        cand = m & np.isin(subregions_rc, BODY_SUBREGIONS)
        lab, k = ndimage.label(cand)
        sizes = ndimage.sum(cand, lab, index=np.arange(1, k + 1))
        body = lab == int(np.argmax(sizes)) + 1
    else:
        body = body_mask(m) if m.any() else None
    if body is None or body.sum() < MIN_BODY_PIXELS:
        return None
    return ndimage.binary_fill_holes(ndimage.binary_closing(body, iterations=2) | body)


def body_frame(body: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre ``(row, col)`` of a body section and its own axes: ``along`` (anterior ->
    posterior, parallel to the mean of the two endplates) and ``up`` (perpendicular, superior).

    A real body is seldom square to the plane's rows (lordosis at L5, a plane axis from one-sided
    neighbours): heights taken down the plane's columns would cut its anterior or posterior wall.
    The endplate direction is fitted to the upper and lower boundary over the central 60 % of the
    section's columns, away from the rounded corners and osteophytes.
    """
    rr, cc = np.nonzero(body)
    cols = np.arange(cc.min(), cc.max() + 1)
    lo_c, hi_c = np.quantile(cols, [0.2, 0.8])
    use = [c for c in cols if lo_c <= c <= hi_c and body[:, c].any()]
    slope = 0.0
    if len(use) >= 3:
        tops = [np.nonzero(body[:, c])[0].max() for c in use]
        bots = [np.nonzero(body[:, c])[0].min() for c in use]
        slope = float(np.mean([np.polyfit(use, tops, 1)[0], np.polyfit(use, bots, 1)[0]]))
    along = np.array([slope, 1.0]) / np.hypot(slope, 1.0)
    up = np.array([along[1], -along[0]])
    return np.array([rr.mean(), cc.mean()]), along, up


#: An endplate ends where its boundary turns steeper than this (rise per run in the body's frame):
#: there the boundary is the anterior or posterior wall (or a rounded corner).
MAX_ENDPLATE_SLOPE = 1.0


def _endplate_range(u: np.ndarray, v: np.ndarray, k0: int) -> tuple[float, float]:
    """The ``u`` interval around index ``k0`` over which the boundary ``v(u)`` stays an endplate
    (slope over +-2 pixels at most :data:`MAX_ENDPLATE_SLOPE`; NaN = outside the body)."""
    du = float(u[1] - u[0])
    w = max(1, int(round(2.0 / du)))
    slope = np.full(len(u), np.inf)
    slope[w:-w] = np.abs(v[2 * w:] - v[:-2 * w]) / (2 * w * du)
    ok = np.isfinite(v) & (slope <= MAX_ENDPLATE_SLOPE)
    lo = hi = k0
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(u) - 1 and ok[hi + 1]:
        hi += 1
    return float(u[lo]), float(u[hi])


def section_points(field: np.ndarray, body: np.ndarray, edge_fraction: float
                   ) -> dict[str, tuple[float, float]] | None:
    """The six points on a body section: ``field`` is the (probability or 0/1) map whose 0.5
    level is the body's boundary, ``body`` the body's pixels (for its frame).

    In the body's own frame (:func:`body_frame`) the upper and lower boundaries are traced
    column by column; each endplate runs as far as its boundary stays flatter than
    :data:`MAX_ENDPLATE_SLOPE` (beyond, it is a wall). A1/A2, M1/M2 and P1/P2 lie on the upper
    and lower endplate at ``-edge``, 0 and ``+edge`` of that endplate's half length from its
    middle. Taking the corners' depth for both endplates instead put the anterior points of
    normal real bodies on the concave anterior wall (rims and osteophytes stick out), and a
    column through a sheared L5/L6 crossed its slanted posterior wall.
    """
    from scipy import ndimage

    centre, along, up = body_frame(body)
    reach = float(max(body.shape))
    step = 0.1
    u = np.arange(-reach, reach + 0.5, 0.5)
    v = np.arange(-reach, reach + step, step)
    pts = (centre[:, None, None] + along[:, None, None] * u[None, :, None]
           + up[:, None, None] * v[None, None, :])
    inside = ndimage.map_coordinates(field, pts.reshape(2, -1), order=1, mode="constant",
                                     cval=0.0).reshape(len(u), len(v)) > 0.5
    has = inside.any(axis=1)
    if not has.any():
        return None
    hi = v[np.argmax(np.where(inside, v[None, :], -np.inf), axis=1)] + step / 2
    lo = v[np.argmin(np.where(inside, v[None, :], np.inf), axis=1)] - step / 2
    top, bot = np.where(has, hi, np.nan), np.where(has, lo, np.nan)
    cols = np.nonzero(has)[0]
    k0 = int(cols[np.argmin(np.abs(u[cols] - np.median(u[cols])))])
    out: dict[str, tuple[float, float]] = {}
    for suffix, line in (("1", top), ("2", bot)):
        a, b = _endplate_range(u, line, k0)
        mid, half = (a + b) / 2.0, (b - a) / 2.0 + 0.25
        for key, f in zip("AMP", (-edge_fraction, 0.0, edge_fraction)):
            uu = mid + f * half
            vv = float(np.interp(uu, u, np.nan_to_num(line, nan=0.0)))
            out[key + suffix] = tuple(float(x) for x in centre + uu * along + vv * up)
    return {n: out[n] for n in KEYPOINT_NAMES}


def keypoints_from_mask(mask_rc: np.ndarray, spacing_mm: float = 1.0,
                        subregions_rc: np.ndarray | None = None,
                        edge_fraction: float | None = None
                        ) -> dict[str, tuple[float, float]] | None:
    """The six Genant points ``name -> (row, col)`` (pixels) on the body of a mask section
    (:func:`body_section`, :func:`section_points`).

    ``spacing_mm`` is accepted for symmetry with :func:`heights_from_points` (pixels are square;
    the points do not depend on it). ``None`` when the section has no body.
    """
    ef = MASK_EDGE_FRACTION if edge_fraction is None else float(edge_fraction)
    body = body_section(mask_rc, subregions_rc)
    if body is None:
        return None
    return section_points(body.astype(np.float64), body, ef)


def heights_from_points(points_rc: dict[str, tuple[float, float]], spacing_mm: float) -> Heights:
    """HA, HM, HP (mm) of six ``(row, col)`` points on a plane of square ``spacing_mm`` pixels."""
    def d(a: str, b: str) -> float:
        return float(np.hypot(*(np.subtract(points_rc[a], points_rc[b])))) * spacing_mm

    return Heights(anterior=d("A1", "A2"), middle=d("M1", "M2"), posterior=d("P1", "P2"))


def mask_truth_heights(mask_rc: np.ndarray, spacing_mm: float,
                       subregions_rc: np.ndarray | None = None) -> Heights | None:
    """The reference heights of a mask section (:func:`keypoints_from_mask`), ``None`` without
    a body."""
    kp = keypoints_from_mask(mask_rc, spacing_mm, subregions_rc)
    return None if kp is None else heights_from_points(kp, spacing_mm)
