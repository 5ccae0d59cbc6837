"""Genant grading arithmetic (paper eq. 17-18, DESIGN.md step 4) on known heights."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.findings import GenantGrade, Heights, Morphology, VertebraFinding
from pipeline.genant import assess, grade_spine, heights_from_keypoints, heights_from_mask, reference_heights


def test_heights_are_euclidean_distances_of_the_keypoint_pairs():
    kp = {"A1": (0, 0, 30), "A2": (0, 0, 10), "M1": (0, 15, 28), "M2": (0, 15, 13),
          "P1": (0, 30, 30), "P2": (0, 27, 26)}
    h = heights_from_keypoints(kp)
    assert (h.anterior, h.middle, h.posterior) == (20.0, 15.0, 5.0)


@pytest.mark.parametrize("low, grade", [
    (25.0, GenantGrade.NORMAL),      # 0 % loss
    (20.1, GenantGrade.NORMAL),      # 19.6 %
    (20.0, GenantGrade.MILD),        # exactly 20 % -> grade 1
    (18.8, GenantGrade.MILD),        # 24.8 %
    (18.75, GenantGrade.MODERATE),   # exactly 25 % -> grade 2
    (15.0, GenantGrade.MODERATE),    # exactly 40 % -> still grade 2
    (14.9, GenantGrade.SEVERE),      # 40.4 %
    (5.0, GenantGrade.SEVERE),
])
def test_grade_boundaries_of_the_within_vertebra_loss(low, grade):
    a = assess(Heights(anterior=low, middle=25.0, posterior=25.0))
    assert a.grade == grade
    assert a.height_loss == pytest.approx(1 - low / 25.0)
    assert a.morphology == (Morphology.NORMAL if grade == 0 else Morphology.WEDGE)
    assert a.fractured == (grade >= 1)


def test_the_smallest_height_names_the_morphology():
    assert assess(Heights(25, 15, 25)).morphology == Morphology.BICONCAVE
    assert assess(Heights(15, 25, 25)).morphology == Morphology.WEDGE
    assert assess(Heights(25, 25, 15)).morphology == Morphology.CRUSH


def test_crush_is_judged_against_the_neighbours_reference():
    crushed = Heights(17.0, 16.5, 17.0)     # uniform: eq. 18 sees nothing
    assert assess(crushed).grade == GenantGrade.NORMAL
    a = assess(crushed, reference_mm=25.0)  # largest height 32 % below the neighbours' (gt rule)
    assert a.morphology == Morphology.CRUSH and a.grade == GenantGrade.MODERATE
    assert a.height_loss == pytest.approx(0.32)
    # A wedge with a normal posterior height keeps its within-vertebra grade and shape.
    w = assess(Heights(15.0, 22.0, 25.0), reference_mm=25.0)
    assert w.morphology == Morphology.WEDGE and w.height_loss == pytest.approx(0.4)


def test_reference_is_the_mean_of_the_nearest_normal_neighbours_largest_heights():
    hs = [Heights(20, 19, 20), Heights(12, 12, 12), Heights(24, 23, 24), Heights(10, 20, 20)]
    refs = reference_heights([10, 11, 12, 13], hs, ["T3", "T4", "T5", "T6"])
    assert refs[1] == pytest.approx(22.0)      # mean of 20 (above) and 24 (below)
    assert refs[0] == pytest.approx(24.0)      # the crushed T4 is no one's reference
    assert refs[2] == pytest.approx(20.0)      # T4 crushed, T6 wedge: only T3
    # C2 never serves as a reference
    assert reference_heights([1, 2], [Heights(15, 15, 15), Heights(14, 14, 14)], ["C2", "C3"])[1] is None


def test_grade_spine_notes_a_disagreement_of_more_than_one_grade_and_who_decided():
    orders = [0, 1, 2]
    fs = [VertebraFinding(label=20 + i, name=f"L{i + 1}", centroid_mm=(0, 0, 0)) for i in range(3)]
    for f in fs:
        f.heights_mm = Heights(25, 25, 25)
        f.mask_heights_mm = Heights(25, 25, 25)
    fs[1].heights_mm = Heights(17, 24, 25)       # keypoints: 32 % wedge, grade 2
    fs[1].mask_heights_mm = Heights(21, 24, 25)  # mask: 16 %, grade 0; within 20 % of 25 mm
    grade_spine(fs, orders)
    assert fs[1].genant_grade == GenantGrade.MODERATE and fs[1].grading_source == "keypoints"
    assert any("differ by more than one" in n and "keypoints decided" in n for n in fs[1].notes)


def test_keypoints_far_from_the_mask_heights_still_decide_and_the_disagreement_is_noted():
    # A mask section cut short by a poor outline (a normal real L3 beside a fusion plate): the
    # keypoints, trained on real and synthesised bodies, measure the body; the mask does not.
    fs = [VertebraFinding(label=20 + i, name=f"L{i + 1}", centroid_mm=(0, 0, 0)) for i in range(3)]
    for f in fs:
        f.heights_mm = Heights(27, 26, 27)
        f.mask_heights_mm = Heights(27, 26, 27)
    fs[1].heights_mm = Heights(27.0, 25.5, 27.5)
    fs[1].mask_heights_mm = Heights(19.8, 16.1, 9.6)
    grade_spine(fs, [0, 1, 2])
    assert fs[1].grading_source == "keypoints" and fs[1].genant_grade == GenantGrade.NORMAL
    assert fs[1].heights_mm == Heights(27.0, 25.5, 27.5)
    assert any("differ by more than 20 %" in n and "keypoints decided" in n for n in fs[1].notes)
    assert all(f.grading_source == "keypoints" for f in (fs[0], fs[2]))
    assert fs[0].genant_grade == GenantGrade.NORMAL and not fs[0].notes


def test_c1_and_c2_are_reported_but_never_graded():
    # The dens makes C2's middle "height" anything; a keypoint grade there would be a false fracture.
    fs = [VertebraFinding(label=i + 1, name=n, centroid_mm=(0, 0, 0)) for i, n in enumerate(("C1", "C2", "C3"))]
    for f in fs:
        f.heights_mm = Heights(5.0, 14.0, 15.0)   # a grade 3 wedge by the numbers
        f.mask_heights_mm = Heights(5.0, 14.0, 15.0)
    grade_spine(fs, [0, 1, 2])
    for f in fs[:2]:
        assert f.genant_grade == GenantGrade.NORMAL and f.grading_source == "none"
        assert f.heights_mm is None and f.height_loss is None
        assert "not graded" in f.notes[0]
    assert fs[2].genant_grade == GenantGrade.SEVERE and fs[2].grading_source == "keypoints"


def test_implausible_keypoints_hand_the_decision_to_the_mask():
    fs = [VertebraFinding(label=20, name="L1", centroid_mm=(0, 0, 0))]
    fs[0].heights_mm = Heights(2.0, 24, 25)      # a collapsed keypoint pair (under 3 mm)
    fs[0].mask_heights_mm = Heights(24, 24, 25)
    grade_spine(fs, [0])
    assert fs[0].grading_source == "mask" and fs[0].genant_grade == GenantGrade.NORMAL
    assert "mask decided" in fs[0].notes[0]


def test_mask_heights_of_a_rectangle_body_with_a_separate_arch():
    # 0.5 mm pixels; body 24 mm high (48 rows) x 36 mm deep (72 cols); arch behind a 10 mm canal
    m = np.zeros((80, 160))
    m[10:58, 10:82] = 1.0
    m[20:40, 102:130] = 1.0                     # posterior elements, separated by the canal
    h = heights_from_mask(m, 0.5)
    assert (h.anterior, h.middle, h.posterior) == pytest.approx((24.0, 24.0, 24.0), abs=0.1)


def test_mask_heights_count_partial_volume_edges_by_their_fraction():
    m = np.zeros((80, 160))
    m[10:58, 10:82] = 1.0
    m[58, 10:82] = 0.4                          # a 0.2 mm partial edge
    h = heights_from_mask(m, 0.5)
    assert h.middle == pytest.approx(24.2, abs=0.1)     # the 0.5 level, linear between pixels


def test_mask_heights_see_an_anterior_wedge():
    m = np.zeros((80, 160))
    for col in range(10, 82):
        top = 58 - int(round(24 + 24 * (col - 10) / 71))   # 12 mm anterior -> 24 mm posterior
        m[top:58, col] = 1.0
    h = heights_from_mask(m, 0.5)
    assert h.anterior < 0.7 * h.posterior
    assert assess(h).morphology == Morphology.WEDGE


def test_an_implausibly_tall_neighbour_is_no_reference():
    hs = [Heights(20, 19, 20), Heights(45, 44, 45), Heights(21, 20, 21), Heights(22, 21, 22)]
    refs = reference_heights([10, 11, 12, 13], hs, ["T3", "T4", "T5", "T6"])
    assert refs[2] == pytest.approx(21.0)      # T3 (20) and T6 (22); not the 45 mm T4
    assert assess(hs[2], refs[2]).grade == GenantGrade.NORMAL


def test_evaluation_pairs_leave_out_the_levels_genant_does_not_grade():
    from pipeline.evaluate import grading_pairs

    gt = [{"label": i + 1, "name": n, "partial": False, "fractured": False, "genant_grade": 0}
          for i, n in enumerate(("C1", "C2", "C3"))]
    pairs = grading_pairs(gt, [VertebraFinding(label=3, name="C3", centroid_mm=(0, 0, 0))])
    assert [p["name"] for p in pairs] == ["C3"]


def test_a_mild_grade_within_the_slice_spacing_uncertainty_is_noted_not_changed():
    from pipeline.genant import loss_uncertainty, note_measurement_uncertainty

    h = Heights(13.5, 10.5, 13.0)                  # 22 % biconcave loss on a cervical body
    assert loss_uncertainty(h, 3.0) == pytest.approx(np.sqrt(2) * 3.0 / np.sqrt(6) / 13.5)
    lumbar = Heights(27.0, 20.5, 26.0)             # 24 % on a lumbar body
    for heights, loss, spacing, noted in ((h, 0.22, 3.0, True), (lumbar, 0.24, 0.6, False)):
        f = VertebraFinding(label=4, name="C4", centroid_mm=(0, 0, 0), heights_mm=heights,
                            genant_grade=GenantGrade.MILD, height_loss=loss)
        note_measurement_uncertainty(f, spacing)
        assert f.genant_grade == GenantGrade.MILD
        assert any("measurement uncertainty" in n for n in f.notes) is noted
    severe = VertebraFinding(label=4, name="C4", centroid_mm=(0, 0, 0), heights_mm=Heights(6, 12, 13),
                             genant_grade=GenantGrade.SEVERE, height_loss=0.54)
    note_measurement_uncertainty(severe, 3.0)
    assert not severe.notes


def test_dice_by_region_pools_vertebrae_over_cases():
    from pipeline.evaluate import dice_by_region, segmentation_grading_report

    cases = [{"C4": {"dice": 0.6}, "T1": {"dice": 0.9}},
             {"C5": {"dice": 0.8}, "T2": {"dice": 1.0}, "T3": {"dice": 0.8}}]
    by = dice_by_region(cases)
    assert by == {"cervical": {"dice": pytest.approx(0.7), "vertebrae": 2},
                  "thoracic": {"dice": pytest.approx(0.9), "vertebrae": 3}}
    # pooled per vertebra, unlike the headline Dice, a mean of case means
    full = [{k: {**v, "precision": 1.0, "recall": 1.0, "assd_mm": 0.1, "mssd_mm": 1.0} for k, v in c.items()}
            for c in cases]
    report = segmentation_grading_report(full, [[], []])
    assert report["dice_by_region"] == by and report["dice"] == pytest.approx((0.75 + 0.8667) / 2, abs=1e-3)


def _spine(levels_heights):
    """Findings with uniform heights, and their anatomical orders, from ``[(name, mm), ...]``."""
    from pipeline.levels import BY_NAME

    fs, orders = [], []
    for name, mm in levels_heights:
        lv = BY_NAME[name]
        f = VertebraFinding(label=lv.label, name=name, centroid_mm=(0, 0, -lv.order * 20.0))
        f.heights_mm = Heights(mm, mm, mm)
        fs.append(f)
        orders.append(lv.order)
    return fs, orders


def test_a_normal_c7_is_not_graded_against_the_taller_thoracic_vertebrae():
    """Real thoracic CT: C7 (13 mm, normal for a cervical body) next to T1-T3 (20 mm) was called
    grade 3 when the crush reference took T1; the reference stays within the region."""
    fs, orders = _spine([("C5", 13.0), ("C6", 13.2), ("C7", 13.0), ("T1", 20.0), ("T2", 20.5),
                         ("T3", 21.0)])
    refs = reference_heights(orders, [f.heights_mm for f in fs], [f.name for f in fs])
    assert refs[2] == pytest.approx(13.2)       # C6 only: T1 is of another region
    assert refs[3] == pytest.approx(20.5)       # T2 only
    grade_spine(fs, orders)
    assert [int(f.genant_grade) for f in fs] == [0] * 6


def test_a_c7_without_cervical_neighbours_borrows_no_thoracic_reference():
    fs, orders = _spine([("C7", 13.0), ("T1", 20.0), ("T2", 20.5)])
    assert reference_heights(orders, [f.heights_mm for f in fs], [f.name for f in fs])[0] is None
    grade_spine(fs, orders)
    assert fs[0].genant_grade == GenantGrade.NORMAL


def test_a_crushed_lumbar_vertebra_among_normal_lumbar_ones_is_still_graded():
    fs, orders = _spine([("T12", 24.0), ("L1", 26.0), ("L2", 26.5), ("L3", 17.0), ("L4", 27.0),
                         ("L5", 26.5)])
    grade_spine(fs, orders)
    crushed = fs[3]
    assert crushed.morphology == Morphology.CRUSH and crushed.genant_grade == GenantGrade.MODERATE
    assert crushed.height_loss == pytest.approx(1 - 17.0 / 26.75)   # mean of L2 and L4
    assert all(f.genant_grade == GenantGrade.NORMAL for i, f in enumerate(fs) if i != 3)


def test_a_thoracic_vertebra_alone_in_its_region_borrows_scaled_lumbar_neighbours():
    """A crushed T12 at the top of a lumbar scan: no thoracic neighbour, so L1 stands in, scaled
    by the typical heights (T12 24 mm, L1 25 mm)."""
    from pipeline.genant import TYPICAL_BODY_HEIGHT_MM as typical

    fs, orders = _spine([("T12", 15.0), ("L1", 26.0), ("L2", 26.5)])
    refs = reference_heights(orders, [f.heights_mm for f in fs], [f.name for f in fs])
    assert refs[0] == pytest.approx(26.0 * typical["T12"] / typical["L1"])
    assert refs[1] == pytest.approx(26.5)      # L1 has a lumbar neighbour: T12 is not used
    grade_spine(fs, orders)
    assert fs[0].genant_grade >= GenantGrade.MILD and fs[0].morphology == Morphology.CRUSH


def test_a_vertebra_without_any_heights_is_marked_not_assessed():
    fs, orders = _spine([("L1", 26.0), ("L2", 26.0)])
    fs[1].heights_mm = None
    grade_spine(fs, orders)
    assert fs[1].grading_source == "none" and fs[1].genant_grade == GenantGrade.NORMAL
    assert any("no heights" in n for n in fs[1].notes)


def test_keypoint_heights_too_tall_for_one_body_of_the_level_are_not_graded():
    """Points spanning more than one body (a keypoint on a neighbour's endplate, an atlas taken
    for C3) would report a fracture nobody made: such a vertebra is not assessed."""
    from pipeline.genant import MAX_TYPICAL_FACTOR, TYPICAL_BODY_HEIGHT_MM, body_sized

    fs, orders = _spine([("T6", 19.0), ("T7", 19.5), ("T8", 20.0)])
    fs[1].heights_mm = Heights(25.0, 36.0, 23.0)          # 36 mm > 1.8 x 19.5 mm
    fs[1].mask_heights_mm = Heights(20.0, 19.0, 21.0)
    grade_spine(fs, orders)
    t7 = fs[1]
    assert t7.grading_source == "none" and not t7.assessed and t7.heights_mm is None
    assert t7.genant_grade == GenantGrade.NORMAL and t7.height_loss is None
    assert any("not one body's" in n for n in t7.notes)
    assert t7.not_assessed_reason == "heights not measurable"
    assert fs[0].assessed and fs[2].assessed
    # a large but possible body is graded as it is (the train side's masks reach 1.60 x typical)
    big = 1.6 * TYPICAL_BODY_HEIGHT_MM["T7"]
    assert body_sized(Heights(big, big, big), "T7")
    assert not body_sized(Heights(10, 10, MAX_TYPICAL_FACTOR * TYPICAL_BODY_HEIGHT_MM["T7"] + 0.1), "T7")
    assert body_sized(Heights(40, 40, 40), "C1")          # no typical height: not judged


def test_neighbours_too_tall_for_one_body_serve_as_no_reference():
    """A cervical segmentation that merged two bodies gives its sections 30 mm heights: graded
    against them, a normal 13 mm body would be a grade 3 crush."""
    fs, orders = _spine([("C4", 13.0), ("C5", 30.0), ("C6", 31.0), ("C7", 30.0)])
    refs = reference_heights(orders, [f.heights_mm for f in fs], [f.name for f in fs])
    assert refs[0] is None
    fs[0].heights_mm = Heights(13.0, 12.0, 13.0)
    fs[0].mask_heights_mm = None
    grade_spine(fs[:1] + [_spine([("C5", 30.0)])[0][0]], orders[:2])
    assert fs[0].genant_grade == GenantGrade.NORMAL and fs[0].assessed
