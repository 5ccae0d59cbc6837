"""The TID 1500 fracture report (DESIGN.md "Outputs", contract): read back, it names every
vertebra with its grade as summary.json does, references the SEG segments, and is valid."""
from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.numbering import Anchor, Numbering
from pipeline.outputs import build_outputs, codes
from pipeline.outputs.enums import VerificationFlag
from pipeline.outputs.sr import read_numbering, read_vertebrae
from tests import synthetic_results as synth


def test_sr_passes_dciodvfy_without_errors(case, tmp_path):
    errors, output = synth.dciodvfy_errors(case[2].sr, tmp_path / "sr.dcm")
    assert errors == [], output


def test_sr_read_back_names_every_vertebra_with_its_grade_as_the_summary(case):
    _series, result, out = case
    reported = {v.name: v for v in read_vertebrae(out.sr)}
    summary = result.summary()["vertebrae"]
    assert sorted(reported) == sorted(v["name"] for v in summary)
    for v in summary:
        r = reported[v["name"]]
        assert (r.fractured, int(r.genant_grade), r.morphology.value) == \
            (v["fractured"], v["genant_grade"], v["morphology"]), v["name"]
        assert r.heights_mm == pytest.approx(v["heights_mm"], abs=0.01)
        assert r.height_loss_percent == pytest.approx(100 * v["height_loss"], abs=0.1)


def test_each_group_references_the_seg_segment_of_its_vertebra(case):
    _series, _result, out = case
    segments = {s.SegmentNumber: s for s in out.seg.SegmentSequence}
    sr = hd.sr.Comprehensive3DSR.from_dataset(out.sr, copy=True)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(segments)
    for g, v in zip(groups, read_vertebrae(out.sr)):
        assert g.referenced_segment[0].referenced_sop_instance_uid == out.seg.SOPInstanceUID
        segment = segments[v.referenced_segment_number]
        assert segment.SegmentLabel == v.name
        assert segment.TrackingUID == v.tracking_uid
        site = g.finding_sites[0].value
        assert site.value == segment.get("AnatomicRegionSequence", segment.SegmentedPropertyTypeCodeSequence)[0].CodeValue
    evidence = {item.ReferencedSOPInstanceUID
                for study in out.sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert out.seg.SOPInstanceUID in evidence


def test_private_codes_are_declared_and_ai_result_conventions_hold(case):
    series, _result, out = case
    sr = out.sr
    declared = [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence]
    assert codes.PRIVATE_SCHEME in declared
    assert sr.VerificationFlag == VerificationFlag.UNVERIFIED.value
    assert sr.CompletionFlag == "COMPLETE"
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True).content
    assert report[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    procedure = [i for i in report[0].ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == "121058"]  # Procedure reported
    assert procedure[0].ConceptCodeSequence[0].CodeValue == codes.CT_PROCEDURE.value
    equipment = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "spine-node project"]
    assert equipment and equipment[0].ManufacturerModelName and equipment[0].SoftwareVersions
    assert sr.StudyInstanceUID == series.study_instance_uid


def test_vertebra_without_voxels_is_still_reported(case, tmp_path):
    series, result, _out = case
    import SimpleITK as sitk
    labels = sitk.GetArrayFromImage(result.label_map)
    labels[labels == 23] = 0                     # L4 reported, but no voxels
    lm = sitk.GetImageFromArray(labels)
    lm.CopyInformation(result.label_map)
    partial = synth.SyntheticResult(result.study_instance_uid, result.series_instance_uid,
                                    result.vertebrae, lm)
    out = build_outputs(series, partial)
    reported = {v.name: v for v in read_vertebrae(out.sr)}
    assert reported["L4"].referenced_segment_number is None
    assert "L4" not in {s.SegmentLabel for s in out.seg.SegmentSequence}
    assert len(reported) == len(result.vertebrae)
    errors, output = synth.dciodvfy_errors(out.sr, tmp_path / "sr.dcm")
    assert errors == [], output


def test_no_vertebra_found_gives_an_empty_report_and_key_image_but_no_seg(case, tmp_path):
    series, result, _out = case
    import SimpleITK as sitk
    empty = sitk.Image(result.label_map.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(result.label_map)
    nothing = synth.SyntheticResult(result.study_instance_uid, result.series_instance_uid, [],
                                    empty)
    out = build_outputs(series, nothing)
    assert out.seg is None
    assert [k.value for k, _ in out.items()] == ["sr", "key_image"]
    assert read_vertebrae(out.sr) == []
    for name, ds in (("sr", out.sr), ("key", out.key_image)):
        errors, output = synth.dciodvfy_errors(ds, tmp_path / f"{name}.dcm")
        assert errors == [], output


def test_a_single_vertebra_report_references_its_segment_and_is_valid(case, tmp_path):
    """With one segment, highdicom puts the Segment Identification into the SEG's Shared
    Functional Groups; the SR must still reference that segment (seen on a real run)."""
    series, result, _out = case
    keep = result.vertebrae[0]
    labels = sitk.GetArrayFromImage(result.label_map)
    one = sitk.GetImageFromArray(np.where(labels == keep.label, labels, 0).astype(labels.dtype))
    one.CopyInformation(result.label_map)
    single = dataclasses.replace(result, vertebrae=[keep], label_map=one)
    out = build_outputs(series, single, version=1)
    assert "SegmentIdentificationSequence" in out.seg.SharedFunctionalGroupsSequence[0]
    (reported,) = read_vertebrae(out.sr)
    assert reported.name == keep.name and reported.referenced_segment_number == 1
    errors, output = synth.dciodvfy_errors(out.sr, tmp_path / "sr.dcm")
    assert errors == [], output


def _group_items(out_sr, name: str):
    """Every content item (recursively) of the measurement group of vertebra ``name``."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(out_sr, copy=True)
    for g in sr.content.get_volumetric_roi_measurement_groups():
        if str(g.tracking_identifier) == f"{name} vertebra":
            stack, items = list(g[0].ContentSequence), []
            while stack:
                item = stack.pop()
                items.append(item)
                stack.extend(item.get("ContentSequence", []))
            return items
    raise AssertionError(f"no group for {name}")


def _codes_in(items) -> set[tuple[str, str]]:
    out = set()
    for item in items:
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for c in item.get(key, []):
                out.add((c.CodeValue, c.CodingSchemeDesignator))
    return out


def test_a_vertebra_not_assessed_states_no_finding(case, tmp_path):
    """A partial vertebra (cut by the field of view) and one the grading left out carry neither
    "Fracture Absent", nor a Genant grade, nor heights: only "not assessed" and why."""
    series, result, _out = case
    vertebrae = [dataclasses.replace(v, notes=list(v.notes)) for v in result.vertebrae]
    vertebrae[0].partial = True                       # T12: cut by the field of view
    vertebrae[-1].grading_source = "none"             # L4: no usable heights
    vertebrae[-1].heights_mm = None
    out = build_outputs(series, dataclasses.replace(result, vertebrae=vertebrae), version=1)
    reported = {v.name: v for v in read_vertebrae(out.sr)}
    for name, why in (("T12", "cut by the field of view"), ("L4", "heights not measurable")):
        r = reported[name]
        assert not r.assessed and r.not_assessed == why
        assert (r.fractured, r.genant_grade, r.morphology) == (None, None, None)
        assert r.heights_mm == {} and r.height_loss_percent is None
        found = _codes_in(_group_items(out.sr, name))
        assert (codes.ABSENT.value, "SCT") not in found
        assert (codes.PRESENT.value, "SCT") not in found
        assert (codes.GENANT_GRADE.value, codes.PRIVATE_SCHEME) not in found
        assert (codes.HEIGHT.value, "DCM") not in found
        assert (codes.NOT_ASSESSED_CODES[why].value, codes.PRIVATE_SCHEME) in found
    assert reported["L1"].assessed and reported["L1"].genant_grade == 2   # the others as before
    errors, output = synth.dciodvfy_errors(out.sr, tmp_path / "sr.dcm")
    assert errors == [], output


def test_uncertain_numbering_is_stated_in_the_report_and_in_every_group(case, tmp_path):
    series, result, _out = case
    numbering = Numbering("uncertain", "no rib-bearing to rib-free transition, no sacrum and no "
                                       "C2 in the field of view")
    out = build_outputs(series, dataclasses.replace(result, numbering=numbering), version=1)
    stated = read_numbering(out.sr)
    assert stated is not None and stated.status == "uncertain"
    assert stated.statement == ("Vertebral level numbering uncertain: no rib-bearing to rib-free "
                                "transition, no sacrum and no C2 in the field of view")
    reported = read_vertebrae(out.sr)
    assert len(reported) == len(result.vertebrae)
    assert all(r.numbering_note == stated.statement for r in reported)
    errors, output = synth.dciodvfy_errors(out.sr, tmp_path / "sr.dcm")
    assert errors == [], output


def test_anchored_numbering_is_stated_once_at_the_report_level(case, tmp_path):
    series, result, _out = case
    numbering = Numbering("anchored", "the vertebra above the sacrum (...) is L5",
                          (Anchor("sacrum", "L5", "L5", "the vertebra above the sacrum"),))
    out = build_outputs(series, dataclasses.replace(result, numbering=numbering), version=1)
    stated = read_numbering(out.sr)
    assert stated.status == "anchored" and "anchored" in stated.statement
    assert all(r.numbering_note is None for r in read_vertebrae(out.sr))
    errors, output = synth.dciodvfy_errors(out.sr, tmp_path / "sr.dcm")
    assert errors == [], output


def test_without_a_numbering_the_report_states_none(case):
    assert read_numbering(case[2].sr) is None
