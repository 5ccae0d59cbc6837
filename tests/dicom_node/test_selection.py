"""The pure parts of series selection: each rule operator on header values, the kernel map,
and the ranking's choice per part of the spine (issue 27)."""
from __future__ import annotations

import pytest

from config import load_settings
from config.settings import SelectionRule
from dicom_node.ranking import choose, superseding_series
from dicom_node.selection import SeriesFacts, check, evaluate, kernel_class


def _facts(uid="1.1", kernel="B70f", thickness=1.0, coverage=300.0, number=2,
           z=(-300.0, 0.0), frame="1.9", **attributes) -> SeriesFacts:
    return SeriesFacts(uid, "CT", 300, {"ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
                                        "ConvolutionKernel": kernel, **attributes},
                       series_number=number, frame_of_reference_uid=frame,
                       slice_thickness_mm=thickness, slice_spacing_mm=thickness,
                       z_coverage_mm=coverage, axial_tilt_deg=0.0, z_range_mm=z)


@pytest.mark.parametrize("operator, value, actual, failure", [
    ("equals", "SPINE", "spine ", None),
    ("equals", 2.0, 2.0, None),
    ("equals", "HEAD", "SPINE", "A SPINE is not 'HEAD'"),
    ("not_equals", "HEAD", None, None),                  # missing: negative rules pass
    ("contains", "ORIGINAL", ("ORIGINAL", "PRIMARY"), None),
    ("contains", "ORIG", ("ORIGINAL", "PRIMARY"), "A ORIGINAL\\PRIMARY does not contain 'ORIG'"),
    ("contains", "bone", "Spine BONE 1mm", None),        # single-valued: a substring
    ("not_contains", "LOCALIZER", ("ORIGINAL", "LOCALIZER"),
     "A ORIGINAL\\LOCALIZER contains 'LOCALIZER'"),
    ("regex", r"^B[67]\d", "B70f", None),
    ("regex", r"^B[67]\d", "B30f", "A B30f does not match '^B[67]\\\\d'"),
    ("min", 50.0, 49.96, "A 50 is below 50"),
    ("max", 3.0, (0.7, 3.5), "A 0.7\\3.5 is above 3"),
    ("range", [0.3, 1.0], (0.7, 0.7), None),
    ("range", [0.3, 1.0], "x", "A x is not a number"),
    ("max", 3.0, None, "A is missing"),
])
def test_each_operator(operator, value, actual, failure):
    rule = SelectionRule(attribute="BodyPartExamined", operator=operator, value=value)
    got = check(rule, actual)
    assert (got.replace("BodyPartExamined", "A") if got else None) == failure


def test_kernel_map_first_class_wins_case_insensitively():
    kernels = load_settings().selection.kernels
    assert [kernel_class(k, kernels) for k in ("B70f", "br64", "BONEPLUS", "B30f", "STANDARD",
                                               "H31s", "")] == \
        ["bone", "bone", "bone", "soft", "soft", None, None]


def test_evaluate_lists_every_failed_rule():
    sel = load_settings(selection={"rules": [
        {"attribute": "BodyPartExamined", "operator": "equals", "value": "SPINE"}]}).selection
    facts = _facts(thickness=5.0, coverage=40.0, BodyPartExamined="HEAD")
    verdict = evaluate(facts, sel)
    assert not verdict.eligible
    assert verdict.reasons == [
        "slice_thickness_mm 5 is above 3 (selection.max_slice_mm)",
        "slice_spacing_mm 5 is above 3 (selection.max_slice_mm)",
        "z_coverage_mm 40 is below 50 (selection.min_coverage_mm)",
        "BodyPartExamined HEAD is not 'SPINE' (selection.rules[0]: BodyPartExamined equals "
        "'SPINE')"]
    assert evaluate(_facts(BodyPartExamined="spine"), sel).eligible


def test_ranking_bone_then_thin_then_coverage_then_number():
    kernels = load_settings().selection.kernels
    candidates = [_facts("1.5", kernel="B30f", thickness=0.6),
                  _facts("1.4", kernel="", thickness=0.6),
                  _facts("1.3", thickness=2.0),
                  _facts("1.2", thickness=1.0, coverage=250.0, z=(-250.0, 0.0)),
                  _facts("1.1", thickness=1.0, number=7),
                  _facts("1.0", thickness=1.0, number=3)]
    decisions = choose(candidates, kernels)
    assert [(d.series_instance_uid, d.chosen) for d in decisions] == [
        ("1.0", True), ("1.1", False), ("1.2", False), ("1.3", False), ("1.5", False),
        ("1.4", False)]
    assert decisions[0].reason == ("chosen: B70f bone kernel, 1 mm slices, 300 mm z "
                                   "coverage; first of 6 eligible series")
    assert decisions[-1].reason == ("not chosen: series 1.0 (B70f bone kernel, 1 mm slices, "
                                    "300 mm z coverage) is analysed")


def test_non_overlapping_parts_of_the_spine_are_each_analysed_once():
    kernels = load_settings().selection.kernels
    thorax = _facts("1.1", z=(-600.0, -300.0))
    thorax_soft = _facts("1.2", kernel="B30f", z=(-600.0, -300.0))
    lumbar = _facts("1.3", kernel="B30f", z=(-290.0, -90.0))
    elsewhere = _facts("1.4", z=(-290.0, -90.0), frame="other")  # another frame: overlaps
    decisions = {d.series_instance_uid: d for d in choose([lumbar, thorax_soft, thorax,
                                                           elsewhere], kernels)}
    assert decisions["1.1"].chosen and decisions["1.3"].chosen
    assert "part of the spine no other chosen series covers" in decisions["1.3"].reason
    assert decisions["1.2"].reason.startswith("not chosen: series 1.1 ")
    assert decisions["1.4"].reason.startswith("not chosen: series 1.1 ")


def test_series_chosen_before_stays_chosen_while_its_analysis_is_under_way():
    kernels = load_settings().selection.kernels
    earlier = _facts("1.1", kernel="B30f")
    late = _facts("1.2")
    [d] = choose([late], kernels, kept=[earlier])
    assert not d.chosen
    assert d.reason.endswith("is analysed (chosen before this series arrived; its analysis "
                             "is under way)")


def test_late_better_series_supersedes_a_finished_answer_a_worse_one_does_not():
    kernels = load_settings().selection.kernels
    earlier = _facts("1.1", kernel="B30f")
    better, same, worse = _facts("1.2"), _facts("1.3", kernel="B31f", number=1), \
        _facts("1.4", kernel="B30f", thickness=2.0)
    decisions = {d.series_instance_uid: d for d in choose([better, same, worse], kernels,
                                                          kept=[earlier], finished=["1.1"])}
    assert decisions["1.2"].chosen and decisions["1.2"].reason == (
        "chosen: B70f bone kernel, 1 mm slices, 300 mm z coverage; arrived after series 1.1 "
        "(B30f soft kernel, 1 mm slices, 300 mm z coverage) was analysed and supersedes it")
    assert (decisions["1.1"].chosen, decisions["1.1"].superseded_by) == (False, "1.2")
    assert decisions["1.1"].reason.startswith("superseded: series 1.2 (B70f bone kernel")
    assert superseding_series(decisions["1.1"].reason) == "1.2"
    for uid in ("1.3", "1.4"):                   # the newcomer analysed instead is named
        assert decisions[uid].reason.startswith("not chosen: series 1.2 ")
    # No better (same kernel class, thickness and coverage): the answer stays, no churn.
    [d] = choose([same], kernels, kept=[earlier], finished=["1.1"])
    assert not d.chosen and d.reason.endswith("(chosen before this series arrived)")
    # Another part of the spine beside a finished one: analysed as a part, nothing replaced.
    lumbar = _facts("1.5", z=(-290.0, -100.0))
    thorax = _facts("1.1", kernel="B30f", z=(-600.0, -300.0))
    [d] = choose([lumbar], kernels, kept=[thorax], finished=["1.1"])
    assert d.chosen and "part of the spine no other chosen series covers" in d.reason


def test_reasons_never_show_an_identifying_value():
    rule = SelectionRule(attribute="PatientID", operator="regex", value="^TEST")
    assert check(rule, "PAT-12345") == "PatientID (value not shown) does not match '^TEST'"


def test_enhanced_ct_facts_come_from_the_functional_groups(tmp_path):
    """One multi-frame Enhanced CT instance (PS3.3 C.7.6.16): orientation, positions and
    SliceThickness live in the functional group sequences, frames in descending z."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    from dicom_node.series_facts import read_series_facts

    def item(**kw):
        ds = Dataset()
        for k, v in kw.items():
            setattr(ds, k, v)
        return ds

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SharedFunctionalGroupsSequence = [item(
        PixelMeasuresSequence=[item(PixelSpacing=[0.5, 0.6], SliceThickness=2.0)],
        PlaneOrientationSequence=[item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])]
    ds.PerFrameFunctionalGroupsSequence = [
        item(PlanePositionSequence=[item(ImagePositionPatient=[1.0, 2.0, 10.0 - 2 * k])])
        for k in range(6)]
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    facts = read_series_facts("1.2", "CT", 6, [tmp_path / "enhanced.dcm"], [])
    assert facts.error is None
    assert facts.attributes["ImageType"] == ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")
    assert (facts.slice_thickness_mm, facts.slice_spacing_mm, facts.z_coverage_mm,
            facts.axial_tilt_deg, facts.z_range_mm) == (2.0, 2.0, 10.0, 0.0, (0.0, 10.0))
