"""Anatomical anchors of the level numbering (pipeline/anchors.py) on synthetic volumes made here
(bright boxes for vertebrae, bone rods beside the thoracic ones for ribs, a wide block below for a
sacrum) and, where ../shared/data/real-spine is present, on a real CT with its mask's centroids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.anchors import (
    RibEvidence,
    apply_numbering,
    decide,
    find_numbering,
    position,
)
from pipeline.levels import BY_NAME, LEVELS

REAL = Path(__file__).resolve().parents[2].parent / "shared/data/real-spine"
STEP_MM = 30.0
SPACING_MM = 2.0


@dataclass
class Detected:
    label: int
    centroid_mm: tuple[float, float, float]


def _box(arr, origin, lo, hi, hu):
    """Set the LPS box ``lo``..``hi`` (mm, x y z) of ``arr`` ([z, y, x]) to ``hu``."""
    i0 = [max(0, int(np.ceil((lo[k] - origin[k]) / SPACING_MM))) for k in range(3)]
    i1 = [int(np.floor((hi[k] - origin[k]) / SPACING_MM)) + 1 for k in range(3)]
    arr[i0[2]:i1[2], i0[1]:i1[1], i0[0]:i1[0]] = hu


def spine_volume(names, ribs=None, sacrum=True, half_width_mm=130.0, one_sided=()):
    """A synthetic CT (LPS, 2 mm) of the vertebrae ``names`` (cranial to caudal, 30 mm apart,
    the last at z = 0) and their centroids. ``ribs``: names with a rib on both sides (default:
    the thoracic ones); ``one_sided``: names with a rib on the patient's right only."""
    ribs = [n for n in names if n.startswith("T")] if ribs is None else list(ribs)
    z_top = (len(names) - 1) * STEP_MM + 40.0
    origin = (-half_width_mm, -100.0, -100.0)
    size = (int(2 * half_width_mm / SPACING_MM) + 1, 101, int((z_top + 100.0) / SPACING_MM) + 1)
    arr = np.full(size[::-1], -1000.0, np.float32)
    zz, yy, xx = np.meshgrid(*(origin[k] + SPACING_MM * np.arange(size[k]) for k in (2, 1, 0)),
                             indexing="ij")
    arr[(xx / 125.0) ** 2 + (yy / 95.0) ** 2 < 1] = 40.0              # soft tissue
    cents = []
    for i, name in enumerate(names):
        cz = (len(names) - 1 - i) * STEP_MM
        cents.append((0.0, 0.0, cz))
        _box(arr, origin, (-20, -15, cz - 10), (20, 15, cz + 10), 300.0)     # body
        _box(arr, origin, (-8, 15, cz - 8), (8, 35, cz + 8), 300.0)          # arch
        _box(arr, origin, (-42, 15, cz - 4), (42, 22, cz + 4), 300.0)        # transverse proc.
        for sign in ((-1, 1) if name in ribs else (-1,) if name in one_sided else ()):
            for d in np.arange(18.0, 112.0, SPACING_MM):                     # descending rib
                zc = cz + 4.0 - 0.25 * (d - 18.0)
                x0, x1 = sorted((sign * d, sign * (d + SPACING_MM)))
                _box(arr, origin, (x0, 8, zc - 3), (x1, 16, zc + 3), 400.0)
    if sacrum:
        _box(arr, origin, (-110, -15, -80), (110, 40, -17), 300.0)
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(origin)
    img.SetSpacing((SPACING_MM,) * 3)
    return img, cents


def detected(names, cents, shift=0):
    """Vertebrae as a localizer would report them, every name moved by ``shift`` levels."""
    std = [lv for lv in LEVELS if lv.name not in ("T13", "L6")]
    return [Detected(std[position(n) + shift].label, c) for n, c in zip(names, cents)]


THORACOLUMBAR = ["T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]


@pytest.fixture(scope="module")
def thoracolumbar():
    return spine_volume(THORACOLUMBAR)


def test_last_rib_and_sacrum_anchor_a_correctly_named_chain(thoracolumbar):
    img, cents = thoracolumbar
    num = find_numbering(img, detected(THORACOLUMBAR, cents))
    assert num.status == "anchored" and num.shift == 0
    assert {(a.kind, a.anatomical_name, a.detected_name) for a in num.anchors} == {
        ("last_rib", "T12", "T12"), ("sacrum", "L5", "L5")}
    assert [r.kind for r in num.ribs] == ["R"] * 5 + ["F"] * 5
    assert num.names == tuple(THORACOLUMBAR)
    assert num.as_dict()["status"] == "anchored" and len(num.as_dict()["anchors"]) == 2


@pytest.mark.parametrize("shift", [-4, 2])
def test_a_shifted_labelling_is_corrected_along_the_whole_chain(thoracolumbar, shift):
    img, cents = thoracolumbar
    names = THORACOLUMBAR[:-2] if shift > 0 else THORACOLUMBAR   # L4/L5 + 2 would leave the spine
    wrong = detected(names, cents[:len(names)], shift)
    num = find_numbering(img, wrong)
    assert num.status == "anchored"
    assert num.shift == -shift
    assert num.names == tuple(names)
    renamed, applied = apply_numbering(wrong, num)
    assert applied.applied
    assert [v.label for v in renamed] == [BY_NAME[n].label for n in names]
    assert [v.centroid_mm for v in renamed] == [v.centroid_mm for v in wrong]


def test_the_result_does_not_depend_on_the_orientation_of_the_series(thoracolumbar):
    img, cents = thoracolumbar
    wrong = detected(THORACOLUMBAR, cents, -4)
    for code in ("RAS", "PIR"):
        num = find_numbering(sitk.DICOMOrient(img, code), wrong)
        assert (num.status, num.shift, num.names) == ("anchored", 4, tuple(THORACOLUMBAR)), code


def test_six_lumbar_vertebrae_between_the_last_rib_and_the_sacrum_name_an_l6():
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "L6"]
    img, cents = spine_volume(names)
    as_five = [Detected(BY_NAME[n].label, c) for n, c in
               zip(["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"], cents)]
    num = find_numbering(img, as_five)
    assert num.status == "anchored"
    assert num.names == tuple(names)


def test_no_ribs_and_no_sacrum_in_a_narrow_field_is_uncertain_with_a_reason():
    names = ["L1", "L2", "L3", "L4", "L5"]
    img, cents = spine_volume(names, sacrum=False, half_width_mm=50.0)
    num = find_numbering(img, detected(names, cents, -4))
    assert num.status == "uncertain" and num.shift == 0 and not num.anchors
    assert num.names == tuple(detected_names(names, -4))          # nothing renamed
    assert "ribs not assessable" in num.reason and "sacrum" in num.reason
    assert "C2" in num.reason
    assert num.statement.startswith("Vertebral level numbering uncertain: ")
    renamed, same = apply_numbering(detected(names, cents, -4), num)
    assert not same.applied and [v.label for v in renamed] == [
        BY_NAME[n].label for n in detected_names(names, -4)]


def detected_names(names, shift):
    std = [lv.name for lv in LEVELS if lv.name not in ("T13", "L6")]
    return [std[position(n) + shift] for n in names]


def test_a_wide_field_without_ribs_or_sacrum_says_so():
    names = ["L1", "L2", "L3", "L4"]
    img, cents = spine_volume(names, sacrum=False)
    num = find_numbering(img, detected(names, cents))
    assert num.status == "uncertain"
    assert "no rib-bearing vertebra" in num.reason and "no sacrum" in num.reason


def test_a_rib_on_one_side_only_makes_the_numbering_uncertain_not_shifted():
    names = ["T10", "T11", "T12", "L1", "L2"]
    img, cents = spine_volume(names, ribs=["T10", "T11"], one_sided=["T12"], sacrum=False)
    num = find_numbering(img, detected(names, cents, -3))
    assert num.status == "uncertain" and num.shift == 0
    assert "one side only" in num.reason


def test_four_rib_free_vertebrae_above_the_sacrum_are_transitional_anatomy():
    ribs = [RibEvidence(n, "rib", "rib") for n in ("T11", "T12")] + \
        [RibEvidence(n, "none", "none") for n in ("L1", "L2", "L3", "L4")]
    names = ["T11", "T12", "L1", "L2", "L3", "L4"]
    cents = [(0.0, 0.0, -30.0 * i) for i in range(len(names))]
    num = decide(names, cents, ribs, ("sacrum", "test"), None)
    assert num.status == "uncertain" and "4 rib-free vertebrae" in num.reason


def test_anchors_that_disagree_shift_nothing():
    names = ["C1", "C2", "C3"]
    cents = [(0.0, 0.0, -16.0 * i) for i in range(3)]
    ribs = [RibEvidence(n, "none", "none") for n in names]
    # the skull base right above says C1, the sacrum below says L5: no single shift fits
    num = decide(names, cents, ribs, ("sacrum", "test"), ("skull", 5.0))
    assert num.status == "uncertain" and "disagree" in num.reason and num.shift == 0


def test_the_skull_base_right_above_names_the_highest_vertebra():
    names = ["C3", "C4", "C5"]
    cents = [(0.0, 0.0, -16.0 * i) for i in range(3)]
    ribs = [RibEvidence(n, "not visible", "not visible") for n in names]
    num = decide(names, cents, ribs, ("not visible", ""), ("skull", 20.0))
    assert num.status == "anchored" and num.names == ("C2", "C3", "C4") and num.shift == -1


def neck_volume(half_width_mm: float, skull: bool):
    """A synthetic CT (LPS, 2 mm) of C1-C4 (16 mm apart, C1 at z = 0) in a field of view
    ``half_width_mm`` to each side, with (``skull``) an occipital plate 10 mm above C1 behind the
    canal, wider than the field; their centroids."""
    origin = (-half_width_mm, -60.0, -80.0)
    size = (int(2 * half_width_mm / SPACING_MM) + 1, 81, 81)
    arr = np.full(size[::-1], 40.0, np.float32)
    cents = []
    for i in range(4):
        cz = -16.0 * i
        cents.append((0.0, 0.0, cz))
        _box(arr, origin, (-12, -10, cz - 6), (12, 8, cz + 6), 300.0)       # body
        _box(arr, origin, (-25, 8, cz - 4), (25, 30, cz + 4), 300.0)        # arch
    if skull:
        _box(arr, origin, (-200, 10, 10), (200, 70, 18), 700.0)
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(origin)
    img.SetSpacing((SPACING_MM,) * 3)
    return img, cents


@pytest.mark.parametrize("half_width_mm", [70.0, 120.0])
def test_a_skull_base_in_view_anchors_even_where_the_field_is_narrower_than_the_test(half_width_mm):
    """Bone spanning the skull base's width is evidence wherever the field shows it; only its
    absence needs the whole search box in view (the box reaches 85 mm to each side)."""
    from pipeline.anchors import skull_above

    img, cents = neck_volume(half_width_mm, skull=True)
    state, gap = skull_above(img, cents[0])
    assert state == "skull" and 8.0 <= gap <= 12.0
    names = ["C3", "C4", "C5", "C6"]                            # two levels low
    num = find_numbering(img, [Detected(BY_NAME[n].label, c) for n, c in zip(names, cents)])
    assert num.status == "anchored" and num.names == ("C1", "C2", "C3", "C4")


def test_no_skull_base_is_none_in_a_wide_field_and_not_visible_in_a_narrow_one():
    from pipeline.anchors import skull_above

    wide, cents = neck_volume(120.0, skull=False)
    assert skull_above(wide, cents[0])[0] == "none"
    narrow, cents = neck_volume(70.0, skull=False)
    assert skull_above(narrow, cents[0])[0] == "not visible"


def test_a_sacrum_seen_in_a_field_cut_in_front_of_the_spine_still_counts():
    """The slices below the lowest vertebra lack their anterior quarter (the field of view ends
    at the vertebral bodies' centre): the sacrum's width is still seen, and it anchors."""
    from pipeline.anchors import sacrum_below

    names = ["L1", "L2", "L3", "L4", "L5"]
    img, cents = spine_volume(names)
    front = int(round((0.0 - img.GetOrigin()[1]) / SPACING_MM))            # y >= 0 only
    cut = sitk.RegionOfInterest(img, [img.GetSize()[0], img.GetSize()[1] - front, img.GetSize()[2]],
                                [0, front, 0])
    state, _ = sacrum_below(cut, cents[-1], cents[-2], STEP_MM)
    assert state == "sacrum"
    num = find_numbering(cut, detected(names, cents, -1))
    assert num.status == "anchored" and num.names == tuple(names)
    no_sacrum, _ = spine_volume(names, sacrum=False)
    cut_none = sitk.RegionOfInterest(no_sacrum, cut.GetSize(), [0, front, 0])
    assert sacrum_below(cut_none, cents[-1], cents[-2], STEP_MM)[0] == "not visible"


def test_the_pipeline_renames_the_localizers_chain_but_keeps_supplied_labels(thoracolumbar):
    from pipeline.localization.infer import LocalizedVertebra
    from pipeline.run import _anchor_levels

    img, cents = thoracolumbar
    wrong = [LocalizedVertebra(label=d.label, name=LEVELS[0].name, centroid_mm=d.centroid_mm,
                               score=1.0) for d in detected(THORACOLUMBAR, cents, -4)]
    found, num = _anchor_levels(img, wrong, renumber=True)
    assert num.applied and num.status == "anchored"
    assert [v.name for v in found] == THORACOLUMBAR
    assert [v.label for v in found] == [BY_NAME[n].label for n in THORACOLUMBAR]
    kept, num2 = _anchor_levels(img, detected(THORACOLUMBAR, cents, -4), renumber=False)
    assert [v.label for v in kept] == [d.label for d in detected(THORACOLUMBAR, cents, -4)]
    assert num2.status == "uncertain" and not num2.applied and "supplied" in num2.reason


def test_summary_json_carries_the_numbering_beside_the_contract_keys():
    import json

    from pipeline.numbering import Anchor, Numbering
    from pipeline.run import AnalysisResult

    numbering = Numbering("anchored", "the vertebra above the sacrum is L5",
                          (Anchor("sacrum", "L4", "L5", "the vertebra above the sacrum"),), 1)
    result = AnalysisResult("1.2", "1.2.3", [], sitk.Image(2, 2, 2, sitk.sitkUInt8),
                            {"total": 1.0}, numbering)
    summary = json.loads(json.dumps(result.summary()))
    assert set(summary) == {"study_instance_uid", "series_instance_uid", "vertebrae",
                            "timings_s", "numbering"}
    assert summary["numbering"] == {
        "status": "anchored", "reason": "the vertebra above the sacrum is L5", "shift": 1,
        "applied": False,
        "anchors": [{"kind": "sacrum", "detected_name": "L4", "anatomical_name": "L5",
                     "detail": "the vertebra above the sacrum"}]}


# --- real CT (training split only) -------------------------------------------------------------
#: TotalSegmentator v2 ids of totalseg-example -> VerSe labels (26 is S1: not a vertebra here).
TOTALSEG_TO_VERSE = {27: 24, 28: 23, 29: 22, 30: 21, 31: 20, 32: 19, 33: 18}


@pytest.fixture(scope="module")
def totalseg():
    ct_path = REAL / "totalseg-example" / "example_ct.nii.gz"
    mask_path = REAL / "totalseg-example" / "totalseg.nii.gz"
    if not ct_path.exists() or not mask_path.exists():
        pytest.skip(f"{REAL} is not present")
    from pipeline.verse import centroids_from_mask

    cents = centroids_from_mask(sitk.ReadImage(str(mask_path)))
    found = [Detected(TOTALSEG_TO_VERSE[k], c) for k, c in cents.items() if k in TOTALSEG_TO_VERSE]
    return sitk.ReadImage(str(ct_path)), found


def test_real_abdominal_ct_is_anchored_by_its_ribs_and_its_sacrum(totalseg):
    ct, found = totalseg
    num = find_numbering(ct, found)
    assert num.status == "anchored" and num.shift == 0
    assert {(a.kind, a.anatomical_name) for a in num.anchors} == {("last_rib", "T12"),
                                                                  ("sacrum", "L5")}
    assert num.names == ("T11", "T12", "L1", "L2", "L3", "L4", "L5")


def test_real_abdominal_ct_labelled_four_levels_too_high_is_corrected(totalseg):
    ct, found = totalseg
    std = [lv for lv in LEVELS if lv.name not in ("T13", "L6")]
    from pipeline.levels import BY_LABEL

    wrong = [Detected(std[position(BY_LABEL[v.label].name) - 4].label, v.centroid_mm)
             for v in found]
    num = find_numbering(ct, wrong)
    assert num.status == "anchored" and num.shift == 4
    assert num.names == ("T11", "T12", "L1", "L2", "L3", "L4", "L5")


def test_real_ct_cropped_close_to_the_spine_is_uncertain():
    case_dir = REAL / "sub-verse005"
    if not case_dir.exists():
        pytest.skip(f"{REAL} is not present")
    from pipeline.verse import centroids_from_mask, load_verse_case

    case = load_verse_case(case_dir, require_mask=True)
    found = [Detected(k, c) for k, c in centroids_from_mask(case.mask).items()]
    shifted = [Detected(v.label - 4, v.centroid_mm) for v in found]     # L1-L5 named T9-L1
    for labelling in (found, shifted):
        num = find_numbering(case.ct, labelling)
        assert num.status == "uncertain" and num.shift == 0
        assert "ribs not assessable" in num.reason
