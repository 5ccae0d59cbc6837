"""Anatomical anchors of the vertebral level numbering, measured cheaply on the CT.

The localizer names levels from what it learnt of position and shape; on a narrow field of view
that can put every name four levels off. A radiologist numbers the spine from landmarks instead
(Carrino et al., "Effect of spinal segment variants on numbering vertebral levels at lumbar MR
imaging", Radiology 2011; Hughes and Saifuddin, "Numbering of lumbosacral transitional vertebrae
on MRI", AJR 2006):

- **ribs**: the last rib-bearing vertebra is T12 (T11 with 11 rib pairs, T13 with 13; the
  pairs are not counted here, see :mod:`pipeline.numbering`). A rib leaves the costovertebral
  joint and runs laterally, beyond the transverse process; here a vertebra bears a rib on one
  side when a thin bone (> :data:`RIB_HU`) whose medial part (within :data:`RIB_MEDIAL_MM` of
  the centroid) lies at the vertebra's own level reaches at least :data:`RIB_LATERAL_MM`
  laterally (lumbar transverse processes stop short of it; a rib coming down from the
  vertebra above has its medial part higher up; an ilium is far thicker);
- **sacrum**: wide bone directly below the lowest vertebra (the sacral alae fused with the ilia
  across the sacroiliac joints): the vertebra above it is L5, or L6 with six lumbar vertebrae;
- **skull base**: wide bone right above the highest vertebra when that one is cervical: it is C1
  (or C2 where C1 was not found).

Every anchor is measured in physical LPS millimetres on small LPS-aligned resamplings of the CT,
so the series may have any orientation. What a test looks for (a rib, the sacrum's width, the
skull base's span) counts wherever the field of view shows it; only its absence needs the test's
whole region in view. An anchor that is itself ambiguous (a rib on one side
only, a field of view too narrow or too short to see it, a count of lumbar vertebrae other than
5 or 6) makes the numbering ``"uncertain"`` and shifts nothing (the decision and the renaming:
:mod:`pipeline.numbering`, whose types this module re-exports). The thresholds were chosen on the
training-split real CTs (totalseg-example, sub-verse005, sub-verse006, sub-ctfu00003) and checked
on phantoms; the skull-base anchor is covered by none of them (no real CT of the skull base was
available for tuning) and is set conservatively.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.levels import BY_LABEL, BY_NAME
from pipeline.numbering import (
    Anchor,
    DetectedVertebra,
    Numbering,
    RibEvidence,
    RibSide,
    apply_numbering,
    decide,
    position,
    sequence,
    steps,
)

if TYPE_CHECKING:
    from pipeline.junction.infer import Junction

__all__ = ["Anchor", "DetectedVertebra", "Numbering", "RibEvidence", "RibSide", "apply_numbering",
           "decide", "find_numbering", "position", "rib_evidence", "sacrum_below", "sequence",
           "skull_above"]

#: Resampling grid of the measurements (mm) and the value that marks "outside the field of view".
GRID_MM = 2.0
OUTSIDE = -5000.0
#: Rib test: bone threshold, the core around the centroid that is cut off (vertebral body and
#: arch), how near the centroid a rib must start and how far it must reach, and the largest
#: cross-section (mm^2) of a rib between :data:`RIB_SECTION_FROM_MM` and :data:`RIB_LATERAL_MM`
#: (an ilium or scapula is far thicker). 150 HU rather than a cortical 200: on 3 mm slices
#: (totalseg-example) the partial volume of a 12th rib drops below 200 HU along its course.
RIB_HU = 150.0
RIB_CORE_MM = 20.0
RIB_MEDIAL_MM = 40.0
RIB_LATERAL_MM = 70.0
RIB_SECTION_FROM_MM = 55.0
RIB_SECTION_MAX_MM2 = 200.0
#: A rib belongs to a vertebra when the median level of its medial part (within
#: :data:`RIB_MEDIAL_MM`) lies within this many local steps of the centroid.
RIB_LEVEL_STEPS = 0.45
#: Posterior (+y) and anterior (-y) reach of the rib box from the centroid, and its half height.
RIB_Y_MM = (-45.0, 65.0)
RIB_HALF_HEIGHT_MM = 36.0
#: Fraction of a side's box that must lie in the field of view for "no rib" to count.
VISIBLE_FRACTION = 0.9
#: Sacrum test: bone threshold (sacral cancellous bone is of low density), how far bone connected
#: to the spine must reach on both sides, and the window below the lowest centroid (in steps).
SACRUM_HU = 120.0
SACRUM_HALF_WIDTH_MM = 75.0
SACRUM_WINDOW_STEPS = (0.25, 1.0)
SACRUM_MIN_SLICES = 2
SACRUM_Y_MM = (-20.0, 60.0)
#: Skull-base test: bone spanning at least this width (mm), reaching both sides by
#: :data:`SKULL_SIDE_MM`, behind the canal (mandible and teeth are in front), within
#: :data:`SKULL_SEARCH_MM` above the highest centroid (the gap names the vertebra:
#: :data:`pipeline.numbering.SKULL_C1_GAP_MM`).
SKULL_HU = 200.0
SKULL_SPAN_MM = 110.0
SKULL_SIDE_MM = 45.0
SKULL_Y_MM = (5.0, 80.0)
SKULL_SEARCH_MM = 45.0


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------
def _box(image: sitk.Image, lo_mm: Sequence[float], hi_mm: Sequence[float]) -> np.ndarray:
    """HU on an LPS-aligned :data:`GRID_MM` grid from ``lo_mm`` to ``hi_mm`` (x, y, z), as
    ``[z, y, x]``; :data:`OUTSIDE` beyond the field of view."""
    size = [max(1, int(round((h - lo) / GRID_MM)) + 1) for lo, h in zip(lo_mm, hi_mm)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([GRID_MM] * 3)
    ref.SetOrigin([float(v) for v in lo_mm])
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, OUTSIDE, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _axis(n: int, lo: float) -> np.ndarray:
    return lo + GRID_MM * np.arange(n)


# ------------------------------------------------------------------------------------------
# the three measurements
# ------------------------------------------------------------------------------------------
def rib_evidence(image: sitk.Image, name: str, centroid: Sequence[float],
                 step_mm: float) -> RibEvidence:
    """The rib test of one vertebra (module docstring), each side on its own."""
    c = np.asarray(centroid, dtype=float)
    half_z = min(RIB_HALF_HEIGHT_MM, max(20.0, 1.1 * step_mm))
    reach = RIB_LATERAL_MM + 15.0
    lo = (c[0] - reach, c[1] + RIB_Y_MM[0], c[2] - half_z)
    hi = (c[0] + reach, c[1] + RIB_Y_MM[1], c[2] + half_z)
    hu = _box(image, lo, hi)
    z = _axis(hu.shape[0], lo[2]) - c[2]
    x = _axis(hu.shape[2], lo[0]) - c[0]
    verdicts: list[RibSide] = []
    reaches: list[float] = []
    for sign in (-1.0, 1.0):                                # LPS -x: patient right
        d = sign * x
        cols = (d >= RIB_CORE_MM) & (d <= reach)
        sub = hu[:, :, cols]
        dd = d[cols]
        # A rib runs down as it runs out: it can be seen to be absent only where the box is in
        # the field of view from the rib neck's level down to the bottom of the box.
        path = z <= RIB_LEVEL_STEPS * step_mm
        visible = float((sub[path] > OUTSIDE / 2).mean()) if path.any() else 0.0
        labels, n = ndimage.label(sub > RIB_HU, structure=np.ones((3, 3, 3)))
        best, found, thick = 0.0, False, False
        if n:
            dgrid = np.broadcast_to(dd[None, None, :], sub.shape)
            # where each component runs medially (its median level there): a rib of this
            # vertebra, or one that comes down from the vertebra above?
            zgrid = np.broadcast_to(z[:, None, None], sub.shape)
            medial = (dgrid <= RIB_MEDIAL_MM) & (labels > 0)
            ids = np.arange(1, n + 1)
            has = np.bincount(labels[medial], minlength=n + 1)[1:] > 0
            level = np.full(n, np.inf)
            if has.any():
                level[has] = np.asarray(ndimage.median(zgrid, np.where(medial, labels, 0),
                                                       ids[has]), dtype=float)
            starts = np.abs(level) <= RIB_LEVEL_STEPS * step_mm
            far = np.asarray(ndimage.maximum(dgrid, labels, ids), dtype=float)
            outer = (dgrid >= RIB_SECTION_FROM_MM) & (dgrid <= RIB_LATERAL_MM) & (labels > 0)
            section = (np.bincount(labels[outer], minlength=n + 1)[1:] * GRID_MM ** 3
                       / (RIB_LATERAL_MM - RIB_SECTION_FROM_MM))
            if starts.any():
                best = float(far[starts].max())
            long_ = starts & (far >= RIB_LATERAL_MM)
            found = bool((long_ & (section <= RIB_SECTION_MAX_MM2)).any())
            # a long bone too thick for a rib (an ilium, or a rib that touches another bright
            # structure): whether a rib is there cannot be told
            thick = bool(long_.any()) and not found
        reaches.append(best)
        if found:
            verdicts.append("rib")
        elif thick:
            verdicts.append("unclear")
        else:
            verdicts.append("none" if visible >= VISIBLE_FRACTION else "not visible")
    return RibEvidence(name=name, right=verdicts[0], left=verdicts[1],
                       reach_mm=(round(reaches[0], 1), round(reaches[1], 1)))


def sacrum_below(image: sitk.Image, lowest: Sequence[float], above: Sequence[float] | None,
                 step_mm: float) -> tuple[str, str]:
    """``("sacrum" | "none" | "not visible", detail)`` for the region below the lowest vertebra.

    The spine's axis is extended by one step along the last two centroids; in each axial slice
    of the window (:data:`SACRUM_WINDOW_STEPS`), the bone (> :data:`SACRUM_HU`) connected to the
    axis must reach :data:`SACRUM_HALF_WIDTH_MM` on both sides.
    """
    p = np.asarray(lowest, dtype=float)
    u = np.array([0.0, 0.0, -1.0])
    if above is not None:
        v = p - np.asarray(above, dtype=float)
        if v[2] < -1e-6:
            u = v / -v[2]                                   # per mm of descent
    half = SACRUM_HALF_WIDTH_MM + 20.0
    t0, t1 = SACRUM_WINDOW_STEPS
    hits, seen, total = 0, 0, 0
    for dz in np.arange(t0 * step_mm, t1 * step_mm + 1e-6, GRID_MM):
        centre = p + u * dz
        lo = (centre[0] - half, centre[1] + SACRUM_Y_MM[0], centre[2])
        hi = (centre[0] + half, centre[1] + SACRUM_Y_MM[1], centre[2])
        sl = _box(image, lo, hi)[0]                           # [y, x]
        total += 1
        x = _axis(sl.shape[1], lo[0]) - centre[0]
        y = _axis(sl.shape[0], lo[1]) - centre[1]
        wide = np.abs(x) <= SACRUM_HALF_WIDTH_MM + 4.0
        # a slice counts towards "none" only where its whole width is in view; bone that
        # reaches both sides is a hit wherever the field shows it
        seen += int((sl[:, wide] > OUTSIDE / 2).mean() >= VISIBLE_FRACTION)
        labels, _ = ndimage.label(sl > SACRUM_HU, structure=np.ones((3, 3)))
        core = (np.abs(x)[None, :] <= 12.0) & (np.abs(y)[:, None] <= 30.0)
        ids = np.setdiff1d(np.unique(labels[core]), [0])
        if not len(ids):
            continue
        xs = np.broadcast_to(x[None, :], sl.shape)[np.isin(labels, ids)]
        if -xs.min() >= SACRUM_HALF_WIDTH_MM and xs.max() >= SACRUM_HALF_WIDTH_MM:
            hits += 1
    detail = (f"{hits} of {total} slices below with bone {SACRUM_HALF_WIDTH_MM:.0f} mm to both "
              f"sides")
    if hits >= SACRUM_MIN_SLICES:
        return "sacrum", detail
    if seen < 0.6 * total:
        return "not visible", (f"field of view too narrow or too short below ({seen} of {total} "
                               f"slices)")
    return "none", detail


def skull_above(image: sitk.Image, highest: Sequence[float]) -> tuple[str, float | None]:
    """``("skull" | "none" | "not visible", gap in mm)``: bone of the skull base (occiput,
    mastoids) right above the highest vertebra, spanning :data:`SKULL_SPAN_MM` behind the canal."""
    c = np.asarray(highest, dtype=float)
    half = SKULL_SPAN_MM / 2 + 30.0
    lo = (c[0] - half, c[1] + SKULL_Y_MM[0], c[2])
    hi = (c[0] + half, c[1] + SKULL_Y_MM[1], c[2] + SKULL_SEARCH_MM)
    hu = _box(image, lo, hi)
    x = _axis(hu.shape[2], lo[0]) - c[0]
    # Bone that spans the skull base's width is evidence wherever the field shows it; only its
    # absence needs the whole box in view (as the rib test's "rib" against "none").
    for k in range(hu.shape[0]):
        cols = (hu[k] > SKULL_HU).any(axis=0)
        if not cols.any():
            continue
        xs = x[cols]
        if xs.max() - xs.min() >= SKULL_SPAN_MM and xs.min() <= -SKULL_SIDE_MM \
                and xs.max() >= SKULL_SIDE_MM:
            return "skull", float(k * GRID_MM)
    if (hu > OUTSIDE / 2).mean() < VISIBLE_FRACTION:
        return "not visible", None
    return "none", None


def find_numbering(image: sitk.Image, vertebrae: Sequence[DetectedVertebra],
                   junction: Junction | None = None) -> Numbering:
    """Measure the anchors of ``vertebrae`` (any order; label and LPS centroid) on ``image``
    (HU, any orientation) and decide the numbering. ``names`` of the result follow the
    vertebrae in anatomical (label) order.

    ``junction`` (:func:`pipeline.junction.infer.find_junction` on the same chain) stands in
    for the sacrum test where that cannot see the sacrum: its ``"last"`` makes the lowest
    vertebra the one above the sacrum. Where the sacrum test saw the region below and found no
    sacrum, a ``"last"`` contradicts it and fixes nothing."""
    chain = sorted(vertebrae, key=lambda v: BY_LABEL[int(v.label)].order)
    if not chain:
        return Numbering("uncertain", "no vertebra found")
    names = [BY_LABEL[int(v.label)].name for v in chain]
    cents = [np.asarray(v.centroid_mm, dtype=float) for v in chain]
    local, _close = steps(names, cents)
    ribs = [rib_evidence(image, n, c, s) for n, c, s in zip(names, cents, local)]
    sac = sacrum_below(image, cents[-1], cents[-2] if len(cents) > 1 else None, local[-1])
    if junction is not None and junction.state != "none" and sac[0] != "sacrum":
        sac = (("sacrum", junction.detail) if sac[0] == "not visible" else
               ("contradicted", f"the sacrum test found no wide bone below ({sac[1]}), the "
                                f"{junction.detail}"))
    skull = skull_above(image, cents[0]) if BY_NAME[names[0]].region == "C" else None
    return decide(names, cents, ribs, sac, skull)
