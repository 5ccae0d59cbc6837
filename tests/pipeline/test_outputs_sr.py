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
from tests.helpers import synthetic_results as synth


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
        region = segment.get("AnatomicRegionSequence", segment.SegmentedPropertyTypeCodeSequence)
        assert site.value == region[0].CodeValue
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


# --- what a viewer needs: every finding placed on an image (issue 26, OHIF 3.13) -----------------

def _walk(item):
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)


def _groups_by_tracking_uid(sr) -> dict[str, list]:
    """Measurement groups of the report by Tracking UID, as OHIF merges them."""
    (measurements,) = [i for i in sr.ContentSequence
                       if i.ConceptNameCodeSequence[0].CodeValue == "126010"]  # Imaging Measurements
    out: dict[str, list] = {}
    for group in measurements.ContentSequence:
        uid = [i.UID for i in group.ContentSequence if i.ValueType == "UIDREF"][0]
        out.setdefault(uid, []).append(group)
    return out


def _scoords_on(item, sop_instance_uid: str) -> list:
    """SCOORD children of ``item`` whose SELECTED FROM image is ``sop_instance_uid``."""
    return [c for c in item.get("ContentSequence", []) if c.ValueType == "SCOORD"
            and any(ref.ReferencedSOPInstanceUID == sop_instance_uid
                    for img in c.ContentSequence for ref in img.ReferencedSOPSequence)]


def test_every_vertebra_is_placed_on_the_key_image_as_a_viewer_needs(case):
    """OHIF merges a finding's groups by Tracking UID and needs, for each, a SCOORD that
    references an image (top level, or INFERRED FROM under a NUM); a NUM with children but no
    SCOORD it skips with a warning. Without this the SR crashed OHIF 3.13 (issue 26)."""
    _series, result, out = case
    key = out.key_image.SOPInstanceUID
    merged = _groups_by_tracking_uid(out.sr)
    assert len(merged) == len(result.vertebrae)
    for uid, groups in merged.items():
        items = [i for g in groups for i in g.ContentSequence]
        placed = [s for i in items for s in (_scoords_on(i, key) if i.ValueType == "NUM" else [])]
        placed += [i for i in items if i.ValueType == "SCOORD"
                   and i.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key]
        assert placed, f"tracking UID {uid}: nothing on the key image"
        for num in (i for i in items if i.ValueType == "NUM" and "ContentSequence" in i):
            assert _scoords_on(num, key), num.ConceptNameCodeSequence[0].CodeMeaning
    evidence = {item.ReferencedSOPInstanceUID
                for study in out.sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert key in evidence


def _with_keypoints(result):
    """The synthetic vertebrae with Genant points on their mid-sagittal plane (x = 0): anterior
    at y = -3, middle at y = 10, posterior at y = 23 (mm), heights as the box phantom's."""
    out = []
    for v in result.vertebrae:
        zc = v.centroid_mm[2]
        kp = {}
        for tag, y, h in (("A", -3.0, v.heights_mm.anterior), ("M", 10.0, v.heights_mm.middle),
                          ("P", 23.0, v.heights_mm.posterior)):
            kp[f"{tag}1"], kp[f"{tag}2"] = (0.0, y, zc + h / 2), (0.0, y, zc - h / 2)
        out.append(dataclasses.replace(v, keypoints_mm=kp, notes=list(v.notes)))
    return dataclasses.replace(result, vertebrae=out)


def test_heights_are_inferred_from_lines_between_the_genant_points_on_the_key_image(case, tmp_path):
    series, result, _out = case
    out = build_outputs(series, _with_keypoints(result), version=1)
    pixel_mm = float(out.key_image.PixelSpacing[0])
    rows, columns = int(out.key_image.Rows), int(out.key_image.Columns)
    sr = hd.sr.Comprehensive3DSR.from_dataset(out.sr, copy=True)
    by_name = {str(g.tracking_identifier).removesuffix(" vertebra"): g
               for g in sr.content.get_image_measurement_groups()}
    topo = {codes.ANTERIOR.value: "anterior", codes.MIDDLE.value: "middle",
            codes.POSTERIOR.value: "posterior"}
    for v in result.vertebrae:
        lines = {}
        for m in by_name[v.name].get_measurements(name=codes.HEIGHT):
            (coords,) = m.referenced_coordinates
            assert coords.GraphicType == "POLYLINE"
            (image,) = coords.ContentSequence
            assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
                out.key_image.SOPInstanceUID
            line = np.asarray(coords.GraphicData, dtype=float).reshape(-1, 2)
            assert line.shape == (2, 2)
            assert ((line >= 0) & (line <= [columns, rows])).all()
            lines[topo[m.finding_sites[0].topographical_modifier.value]] = (line, float(m.value))
        assert sorted(lines) == ["anterior", "middle", "posterior"]
        for name, (line, value) in lines.items():
            # The points are on the plane of the key image: the line is as long as the height.
            assert np.linalg.norm(line[1] - line[0]) * pixel_mm == pytest.approx(value, abs=0.01)
            assert value == pytest.approx(getattr(v.heights_mm, name), abs=0.01)
        # Anterior is left of posterior on the key image (anterior left, head up).
        assert lines["anterior"][0][:, 0].mean() < lines["posterior"][0][:, 0].mean()
    reported = {r.name: r for r in read_vertebrae(out.sr)}
    assert reported["L1"].heights_mm == pytest.approx(
        {"anterior": 14.0, "middle": 18.0, "posterior": 22.0}, abs=0.01)
    errors, output = synth.dciodvfy_errors(out.sr, tmp_path / "sr.dcm")
    assert errors == [], output


def test_a_vertebra_not_assessed_is_a_region_on_the_key_image_without_measurement(case):
    series, result, _out = case
    vertebrae = [dataclasses.replace(v, notes=list(v.notes)) for v in result.vertebrae]
    vertebrae[0].partial = True                                   # T12
    out = build_outputs(series, dataclasses.replace(result, vertebrae=vertebrae), version=1)
    sr = hd.sr.Comprehensive3DSR.from_dataset(out.sr, copy=True)
    (planar,) = sr.content.get_planar_roi_measurement_groups()
    assert str(planar.tracking_identifier) == "T12 vertebra"
    assert planar.roi.GraphicType == "ELLIPSE"
    assert planar.get_measurements() == []
    assert not [i for i in _walk(planar[0]) if i.ValueType == "NUM"]
    image_groups = {str(g.tracking_identifier) for g in sr.content.get_image_measurement_groups()}
    assert "T12 vertebra" not in image_groups and "L1 vertebra" in image_groups


def test_each_vertebra_states_its_finding_in_words(case):
    """The one line a viewer shows beside the vertebra (DCM 121106 "Comment")."""
    _series, _result, out = case
    comments = [str(i.TextValue) for g in _groups_by_tracking_uid(out.sr).values() for grp in g
                for i in grp.ContentSequence
                if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert sorted(comments) == sorted([
        "T12: no fracture, Genant grade 0 (normal)",
        "L1: fracture, Genant grade 2 (moderate), wedge deformity",
        "L2: no fracture, Genant grade 0 (normal)",
        "L3: no fracture, Genant grade 0 (normal)",
        "L4: no fracture, Genant grade 0 (normal)"])
