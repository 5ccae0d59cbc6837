"""Genant semi-quantitative grading of vertebral bodies (paper section 2.3.3, eq. 17-18; DESIGN.md).

Heights (eq. 17): HA = |A1 A2|, HM = |M1 M2|, HP = |P1 P2| in mm, from the six keypoints of the
mid-sagittal plane, or measured directly on the segmentation mask (:func:`heights_from_mask`).

Height loss and grade (DESIGN.md, step 4):
- within the vertebra: ``loss = 1 - min(HA, HM, HP) / max(HA, HM, HP)`` (eq. 18 gives
  ``G = 1 - loss``); the smallest height names the morphology: anterior -> wedge,
  middle -> biconcave, posterior -> crush;
- against the neighbouring normal vertebrae, for crush fractures where the whole body is lower
  and eq. 18 alone sees nothing: ``loss = 1 - max(HA, HM, HP) / reference``, with the reference
  the mean of the largest heights of the nearest normal vertebra above and below in the same
  region (cervical, thoracic, lumbar: a normal C7 is much lower than T1; :func:`reference_heights`;
  C1 and C2 never serve). The loss reported is the larger of the two, and the morphology is
  crush when the reference loss is the larger;
- grade (:meth:`GenantGrade.from_height_loss`): 0 below 20 %, 1 = 20-25 %, 2 = 25-40 %, 3 above.
  The paper's two-class cut (G < 0.74 moderate/severe, 0.74-0.8 mild) is a special case.

:func:`grade_spine` grades every finding of a spine, compares the keypoint grade with the mask
grade and notes where they differ by more than one grade and which one decided.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.findings import GenantGrade, Heights, Morphology, VertebraFinding
from pipeline.keypoints.truth import MASK_EDGE_FRACTION

#: A height loss at or above this counts as a fracture (Genant grade 1 starts at 20 %).
FRACTURE_LOSS = 0.20
#: Levels whose shape makes them no reference for a neighbour's height (C1 has no body, C2 a dens).
NO_REFERENCE = ("C1", "C2")
#: Levels Genant's method does not grade: the atlas has no vertebral body, and the axis body
#: carries the dens, so neither has the anterior/middle/posterior heights the grade compares
#: (Genant et al. 1993 grade C3-L5 at most; the phantom never fractures C1 or C2).
NOT_GRADED = ("C1", "C2")
_LOSS_DECIMALS = 9
#: Keypoint heights further than this fraction of the mask's largest height from the mask's own
#: heights are noted on the finding (:func:`_plausible`); the keypoints still decide.
KP_MASK_TOLERANCE = 0.2
#: A vertebra this much taller than the local median of its neighbours serves as no reference.
TALLER_THAN_NEIGHBOURS = 1.3
#: Typical largest (posterior) vertebral body height of a normal adult vertebra per level, in mm.
#: Approximate values read from the morphometry of Panjabi et al.: cervical C3-C7 (Spine 1991;
#: 16:861-869), thoracic T1-T12 (Spine 1991;16:888-901), lumbar L1-L5 (Spine 1992;17:299-306);
#: T13 and L6 are given their neighbours' heights. Individual spines differ by 10-15 %, so the
#: table only scales a neighbour of the other region where a vertebra has none of its own
#: (:data:`REFERENCE_FALLBACK`); it never replaces a same-region neighbour.
TYPICAL_BODY_HEIGHT_MM: dict[str, float] = {
    "C3": 14.0, "C4": 14.0, "C5": 14.0, "C6": 14.0, "C7": 15.0,
    "T1": 16.0, "T2": 17.0, "T3": 17.5, "T4": 18.0, "T5": 18.5, "T6": 19.0, "T7": 19.5,
    "T8": 20.0, "T9": 21.0, "T10": 22.0, "T11": 23.0, "T12": 24.0, "T13": 24.5,
    "L1": 25.0, "L2": 26.0, "L3": 26.5, "L4": 26.5, "L5": 26.0, "L6": 26.0,
}
#: Heights of one vertebral body stay within this factor of its level's typical height
#: (:data:`TYPICAL_BODY_HEIGHT_MM`): on the expert masks of the real-data split's train side the
#: largest height is at most 1.60 times it (median 1.16, 136 whole vertebrae:
#: ``python bench/mask_heights.py``), and a fracture only lowers a body. Heights beyond it span
#: more than one body: a keypoint on a neighbour's endplate, a segmentation that merged two
#: bodies, or an atlas or axis taken for a lower level.
MAX_TYPICAL_FACTOR = 1.8
#: Regions whose neighbours may stand in, scaled by :data:`TYPICAL_BODY_HEIGHT_MM`, for a
#: vertebra with no normal neighbour of its own region (a T12 at the top of a lumbar scan).
#: Never between cervical and thoracic: the step from C7 to T1 is too large and too variable
#: (a normal C7 judged against T1 was called a grade 3 fracture on real CT).
REFERENCE_FALLBACK: dict[str, tuple[str, ...]] = {"C": (), "T": ("L",), "L": ("T",), "?": ()}


@dataclass(frozen=True)
class GenantAssessment:
    """Grade, morphology and height loss of one vertebra.

    Attributes:
        grade: Genant grade 0-3.
        morphology: which height is reduced; ``NORMAL`` when the grade is 0.
        height_loss: the loss that decided the grade (0..1).
        within_loss: ``1 - min/max`` of the vertebra's own heights (eq. 18).
        reference_loss: loss of the mean height against the neighbouring normal vertebrae,
            ``None`` without a reference.
    """

    grade: GenantGrade
    morphology: Morphology
    height_loss: float
    within_loss: float
    reference_loss: float | None = None

    @property
    def fractured(self) -> bool:
        return self.grade >= GenantGrade.MILD


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return float(math.dist([float(v) for v in a], [float(v) for v in b]))


def heights_from_keypoints(keypoints_mm: Mapping[str, Sequence[float]]) -> Heights:
    """HA, HM, HP in mm as Euclidean distances of the keypoint pairs (paper eq. 17)."""
    return Heights(anterior=_dist(keypoints_mm["A1"], keypoints_mm["A2"]),
                   middle=_dist(keypoints_mm["M1"], keypoints_mm["M2"]),
                   posterior=_dist(keypoints_mm["P1"], keypoints_mm["P2"]))


def within_loss(h: Heights) -> tuple[float, Morphology]:
    """``1 - min/max`` of the three heights (eq. 18) and the morphology the smallest one names."""
    values = (h.anterior, h.middle, h.posterior)
    hmax = max(values)
    if hmax <= 0:
        return 0.0, Morphology.NORMAL
    k = int(np.argmin(values))
    return 1.0 - values[k] / hmax, (Morphology.WEDGE, Morphology.BICONCAVE, Morphology.CRUSH)[k]


def assess(h: Heights, reference_mm: float | None = None) -> GenantAssessment:
    """Grade one vertebra from its heights and, for crush, the neighbours' reference height.

    ``reference_mm`` is the largest height a normal vertebra has at this level, from
    :func:`reference_heights`; without it only the within-vertebra loss counts.
    """
    loss_in, shape = within_loss(h)
    loss_ref = None
    loss, morph = loss_in, shape
    if reference_mm is not None and reference_mm > 0:
        loss_ref = max(0.0, 1.0 - h.largest / reference_mm)
        # A whole-body reduction (crush) is the one the within-vertebra ratio cannot see; it wins
        # when the body as a whole lost more than any one part lost against the others.
        if loss_ref >= FRACTURE_LOSS and loss_ref > loss_in:
            loss, morph = loss_ref, Morphology.CRUSH
    # Round off floating-point noise so that a loss of exactly 20 % (1 - 20/25 = 0.19999...96)
    # is graded as 20 %, as a radiologist would.
    loss = round(loss, _LOSS_DECIMALS)
    grade = GenantGrade.from_height_loss(loss)
    if grade == GenantGrade.NORMAL:
        morph = Morphology.NORMAL
    return GenantAssessment(grade=grade, morphology=morph, height_loss=float(loss),
                            within_loss=round(float(loss_in), _LOSS_DECIMALS),
                            reference_loss=None if loss_ref is None else round(loss_ref, _LOSS_DECIMALS))


def reference_heights(orders: Sequence[int], heights: Sequence[Heights | None],
                      names: Sequence[str] | None = None) -> list[float | None]:
    """The normal-neighbour reference (mm) of each vertebra of a spine, for crush fractures.

    The mean of the largest heights of the nearest normal vertebra above and of the nearest
    below (one side only at the ends of the scan or of a region), taken only from the vertebra's
    own region (cervical, thoracic, lumbar: :attr:`pipeline.levels.Level.region`). A vertebra
    with no normal neighbour of its own region borrows those of :data:`REFERENCE_FALLBACK`
    (thoracic <-> lumbar), scaled by the ratio of the levels' typical heights
    (:data:`TYPICAL_BODY_HEIGHT_MM`); a cervical vertebra never borrows. ``orders`` are the
    levels' anatomical orders (:attr:`pipeline.levels.Level.order`). A vertebra is "normal" when
    its own heights show less than 20 % within-vertebra loss and its largest height is neither
    20 % below nor 30 % above the median of the candidates of its region within two levels (a
    crushed neighbour would lower the reference, a keypoint blunder raise it); ``names`` in
    :data:`NO_REFERENCE` never serve, nor heights too tall for one body of the level
    (:func:`body_sized`).
    """
    from pipeline.levels import BY_NAME, LEVELS

    tops = [None if h is None else h.largest for h in heights]
    ok = [t is not None and within_loss(h)[0] < FRACTURE_LOSS for t, h in zip(tops, heights)]
    if names is not None:
        ok = [o and n not in NO_REFERENCE and body_sized(h, n) for o, n, h in zip(ok, names, heights)]
    level_names = list(names) if names is not None else [LEVELS[int(o)].name for o in orders]
    region = [BY_NAME[n].region if n in BY_NAME else "?" for n in level_names]

    def scaled(i: int, j: int) -> float:
        if region[i] == region[j]:
            return float(tops[j])
        typical = TYPICAL_BODY_HEIGHT_MM
        return float(tops[j]) * typical.get(level_names[i], 1.0) / typical.get(level_names[j], 1.0)

    def refs_of(ok_: list[bool]) -> list[float | None]:
        out: list[float | None] = []
        for i, oi in enumerate(orders):
            pool = [j for j in range(len(orders)) if ok_[j] and j != i and region[j] == region[i]]
            if not pool:
                pool = [j for j in range(len(orders))
                        if ok_[j] and region[j] in REFERENCE_FALLBACK[region[i]]]
            above = [(oi - orders[j], j) for j in pool if orders[j] < oi]
            below = [(orders[j] - oi, j) for j in pool if orders[j] > oi]
            sides = [scaled(i, min(side)[1]) for side in (above, below) if side]
            out.append(float(np.mean(sides)) if sides else None)
        return out

    # A crushed vertebra passes the within-vertebra test, and a keypoint blunder can make a
    # vertebra implausibly tall: neither serves as a reference. Both are judged against the local
    # median of the candidates of its region within two levels (itself included), which one
    # outlier cannot move.
    odd = []
    for i, oi in enumerate(orders):
        window = [tops[j] for j in range(len(orders))
                  if ok[j] and abs(orders[j] - oi) <= 2 and region[j] == region[i]]
        med = float(np.median(window)) if window else None
        odd.append(ok[i] and med is not None
                   and not ((1.0 - FRACTURE_LOSS) * med <= tops[i] <= TALLER_THAN_NEIGHBOURS * med))
    refs = refs_of([o and not c for o, c in zip(ok, odd)])
    return refs


def heights_from_mask(prob_rc: np.ndarray, spacing_mm: float, threshold: float = 0.5,
                      edge_fraction: float = MASK_EDGE_FRACTION) -> Heights | None:
    """HA, HM, HP in mm measured directly on the mid-sagittal plane of one vertebra's mask.

    ``prob_rc`` is the vertebra's foreground probability (or a 0/1 mask) on a
    :class:`pipeline.keypoints.plane.SagittalPlane`: rows along the spine axis, columns
    anterior -> posterior, square pixels of ``spacing_mm``. The vertebral body is the most anterior
    large connected part of the thresholded plane (the canal separates it from the posterior
    elements in the mid-sagittal plane; :func:`pipeline.keypoints.plane.body_mask`), its holes
    filled (a segmentation hole inside a real body is no lost height). The heights are measured
    as on an expert mask (:func:`pipeline.keypoints.truth.section_points`): in the body's own
    frame, at ``-edge_fraction``, 0 and ``+edge_fraction`` of its waist's half depth, each the
    extent of the probability's 0.5 level (linear between pixels) inside the slightly dilated
    body. Measured down the plane's columns at the corners' depth instead, the anterior height
    of normal real lumbar bodies (concave walls, rims, a tilted L5) came out near 10 mm.
    ``None`` when no body is found.
    """
    from scipy import ndimage

    from pipeline.keypoints.plane import body_mask
    from pipeline.keypoints.truth import section_points

    prob = np.clip(np.asarray(prob_rc, dtype=np.float64), 0.0, 1.0)
    m = prob > threshold
    if m.sum() < 4:
        return None
    body = ndimage.binary_fill_holes(body_mask(m))
    field = prob * ndimage.binary_dilation(body, iterations=2)
    field[body & ~m] = 1.0
    pts = section_points(field, body, edge_fraction)
    if pts is None:
        return None
    from pipeline.keypoints.truth import heights_from_points

    return heights_from_points(pts, spacing_mm)


def grade_spine(findings: Sequence[VertebraFinding], orders: Sequence[int]) -> None:
    """Grade every finding of one spine in place.

    :data:`NOT_GRADED` levels keep grade 0 with no heights and ``grading_source = "none"``, as
    does a vertebra with neither keypoint nor mask heights (not assessed).
    Uses ``heights_mm`` (keypoints) where present, else ``mask_heights_mm``. When both exist and
    their grades differ by more than one, the finding says so in ``notes``; the keypoint grade
    decides unless the keypoint heights are implausible (outside 3-60 mm: :func:`_plausible`), in
    which case the mask decides (``grading_source = "mask"``). Heights too tall for one body of
    the level (:func:`body_sized`: keypoints, or the mask where it decides) leave the vertebra
    not assessed, and serve as no neighbour's reference. Keypoint heights further than
    :data:`KP_MASK_TOLERANCE` from the mask's are noted, and still decide: the keypoints are
    trained on real and synthesised anatomy, while the mask's section follows the segmentation's
    outline, which a metal implant or low contrast cuts short (pipeline/MODEL_CARD.md).
    """
    kp = [f.heights_mm for f in findings]
    mk = [f.mask_heights_mm for f in findings]
    names = [f.name for f in findings]
    ref_kp = reference_heights(orders, kp, names)
    ref_mk = reference_heights(orders, mk, names)
    for f, hk, hm, rk, rm in zip(findings, kp, mk, ref_kp, ref_mk):
        if f.name in NOT_GRADED:
            _leave_ungraded(f, f"{f.name} has no vertebral body of Genant's shape: not graded")
            continue
        a_kp = assess(hk, rk) if hk is not None else None
        a_mk = assess(hm, rm) if hm is not None else None
        chosen, source = a_kp, "keypoints"
        if a_kp is None or not _plausible(hk):
            chosen, source = a_mk, "mask"
        deciding = hk if source == "keypoints" else hm
        if chosen is not None and not body_sized(deciding, f.name):
            # The plane holds more than one body (or no body of this level): the other
            # measurement on the same plane is no better, and grading would report a finding
            # nobody made.
            _leave_ungraded(f, f"{'keypoint' if source == 'keypoints' else 'mask'} heights up to "
                               f"{deciding.largest:.0f} mm exceed {MAX_TYPICAL_FACTOR:g} times a "
                               f"typical {f.name} body ({TYPICAL_BODY_HEIGHT_MM[f.name]:.0f} mm): "
                               f"not one body's; not graded")
            continue
        if source == "keypoints" and hm is not None and not _plausible(hk, hm):
            f.notes.append(f"keypoint and mask heights differ by more than "
                           f"{100 * KP_MASK_TOLERANCE:.0f} % of the body height; the keypoints decided")
        if chosen is None:
            f.notes.append("no heights: neither keypoints nor a mask slice were usable")
            f.grading_source = "none"
            continue
        if a_kp is not None and a_mk is not None and abs(int(a_kp.grade) - int(a_mk.grade)) > 1:
            f.notes.append(
                f"keypoint grade {int(a_kp.grade)} and mask grade {int(a_mk.grade)} differ by more "
                f"than one; the {source} decided")
        f.genant_grade = chosen.grade
        f.morphology = chosen.morphology
        f.height_loss = chosen.height_loss
        f.grading_source = source
        if source == "mask":
            f.heights_mm = hm


def loss_uncertainty(h: Heights, slice_spacing_mm: float) -> float:
    """Standard deviation of the height loss that the slice spacing alone causes.

    Each endplate point is known along the scan axis only to within its slice (uniform over
    +-s/2: SD s/sqrt(12)); a height is the difference of two points (SD s/sqrt(6)), and the loss
    compares two heights, so its SD is about ``sqrt(2) * s / sqrt(6) / max(H)``. At 3 mm slices
    on a 13 mm cervical body that is 13 %, more than half of a grade 1's margin.
    """
    top = h.largest
    if top <= 0 or slice_spacing_mm <= 0:
        return 0.0
    return math.sqrt(2.0) * slice_spacing_mm / math.sqrt(6.0) / top


def note_measurement_uncertainty(f: VertebraFinding, slice_spacing_mm: float) -> None:
    """Note on a mild finding (grade 1) whose margin over the 20 % fracture threshold is less than
    two standard deviations of :func:`loss_uncertainty`: the grade stands (Genant's rule), and the
    reader learns that this series cannot tell it from a normal vertebra. Grades 2-3 and normal
    vertebrae get no note."""
    if f.genant_grade != GenantGrade.MILD or f.heights_mm is None or f.height_loss is None:
        return
    sd = loss_uncertainty(f.heights_mm, slice_spacing_mm)
    if f.height_loss - FRACTURE_LOSS < 2.0 * sd:
        f.notes.append(f"mild grade within the measurement uncertainty of this series: at "
                       f"{slice_spacing_mm:.1f} mm slices the height loss is known to about "
                       f"+-{100 * sd:.0f} % (SD)")


def _leave_ungraded(f: VertebraFinding, note: str) -> None:
    """Report ``f`` as not assessed (no grade, no heights), ``note`` saying why."""
    f.notes.append(note)
    f.genant_grade, f.morphology, f.height_loss = GenantGrade.NORMAL, Morphology.NORMAL, None
    f.heights_mm, f.grading_source = None, "none"


def body_sized(h: Heights | None, name: str) -> bool:
    """Whether ``h`` can be the heights of one ``name`` body: the largest within
    :data:`MAX_TYPICAL_FACTOR` of the level's typical height (levels without one: always)."""
    typical = TYPICAL_BODY_HEIGHT_MM.get(name)
    return h is None or typical is None or h.largest <= MAX_TYPICAL_FACTOR * typical


def _plausible(hk: Heights | None, hm: Heights | None = None) -> bool:
    """Keypoint heights a vertebral body can have: every height 3-60 mm and, where ``hm`` (the
    mask's heights) is given, none further than :data:`KP_MASK_TOLERANCE` of the mask's largest
    height from the mask's height at the same place (the agreement :func:`grade_spine` notes)."""
    if hk is None:
        return False
    values = (hk.anterior, hk.middle, hk.posterior)
    if not all(3.0 <= v <= 60.0 for v in values):
        return False
    if hm is None:
        return True
    ref = (hm.anterior, hm.middle, hm.posterior)
    top = max(ref)
    return top <= 0 or all(abs(v - r) <= KP_MASK_TOLERANCE * top for v, r in zip(values, ref))
