"""The SEG of the vertebrae (DESIGN.md "Outputs", contract): coding, references, validity."""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.outputs import ResultKind, build_outputs, codes
from pipeline.outputs.common import output_identity
from pipeline.outputs.seg import label_frames
from tests.helpers import synthetic_results as synth


def test_seg_passes_dciodvfy_without_errors(case, tmp_path):
    errors, output = synth.dciodvfy_errors(case[2].seg, tmp_path / "seg.dcm")
    assert errors == [], output


def test_one_segment_per_vertebra_coded_normal_or_fracture(case):
    _series, result, out = case
    seg = out.seg
    assert seg.SegmentationType == "BINARY"
    by_label = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert sorted(by_label) == sorted(f.name for f in result.vertebrae)
    for f in result.vertebrae:
        item = by_label[f.name]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
        assert item.TrackingID == f.name
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        vertebra = codes.vertebra_code(__import__("pipeline.levels", fromlist=["level"]).level(f.label))
        if f.fractured:
            assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
            assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("72704001", "SCT")
            region = item.AnatomicRegionSequence[0]
            assert (region.CodeValue, region.CodingSchemeDesignator) == (vertebra.value, "SCT")
        else:
            assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
            assert (prop.CodeValue, prop.CodingSchemeDesignator) == (vertebra.value, "SCT")


def test_frames_reference_their_source_slice_and_empty_frames_are_left_out(case):
    series, result, out = case
    seg = out.seg
    headers = {h.SOPInstanceUID: h for h in series.headers}
    frames = label_frames(result.label_map, series.headers)
    labels = {s.SegmentNumber: next(f.label for f in result.vertebrae if f.name == s.SegmentLabel)
              for s in seg.SegmentSequence}
    expected = sum(int((frames[k] == lab).any()) for lab in labels.values()
                   for k in range(len(series.headers)))
    assert int(seg.NumberOfFrames) == expected < len(series.headers) * len(labels)
    for fg in seg.PerFrameFunctionalGroupsSequence:
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
        source = headers[ref.ReferencedSOPInstanceUID]
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        position = fg.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position],
                           [float(v) for v in source.ImagePositionPatient])
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_instance_uid


def test_masks_read_back_equal_the_label_map(case):
    series, result, out = case
    seg = hd.seg.Segmentation.from_dataset(out.seg, copy=True)
    uids = [h.SOPInstanceUID for h in series.headers]
    frames = label_frames(result.label_map, series.headers)
    for item in out.seg.SegmentSequence:
        label = next(f.label for f in result.vertebrae if f.name == item.SegmentLabel)
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[item.SegmentNumber],
            assert_missing_frames_are_empty=True)[..., 0]
        assert np.array_equal(mask.astype(bool), frames == label), item.SegmentLabel
    # It references exactly the source instances that hold a segment (issue 28: a whole-body
    # series costs no more than its spine).
    labels = [next(f.label for f in result.vertebrae if f.name == item.SegmentLabel)
              for item in out.seg.SegmentSequence]
    holding = {u for u, f in zip(uids, frames) if np.isin(f, labels).any()}
    referenced = {i.ReferencedSOPInstanceUID for s in out.seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == holding and 0 < len(holding) < len(uids)


def test_every_object_is_in_the_source_study_in_its_own_new_series(case):
    series, _result, out = case
    src = series.headers[0]
    seen = {series.series_instance_uid}
    for kind, ds in out.items():
        for attr in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "AccessionNumber", "StudyID"):
            assert str(ds.get(attr)) == str(src.get(attr)), (kind, attr)
        assert ds.SeriesInstanceUID not in seen
        seen.add(ds.SeriesInstanceUID)
        assert ds.SeriesDescription.startswith("spine-node v1 ")
        ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "spine-node project"]
        assert ours and ours[0].ManufacturerModelName == "spine-node" and ours[0].SoftwareVersions
        assert ds.Manufacturer == "spine-node project"


def test_rerun_makes_new_series_and_rebuilding_a_version_reproduces_its_uids(case):
    series, result, out = case
    again = build_outputs(series, result, version=1)
    v2 = build_outputs(series, result, version=2)
    for (kind, a), (_, b), (_, c) in zip(out.items(), again.items(), v2.items()):
        assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
        assert c.SeriesInstanceUID != a.SeriesInstanceUID and c.SOPInstanceUID != a.SOPInstanceUID
        assert c.SeriesDescription.startswith("spine-node v2 "), kind
        assert c.SeriesNumber != a.SeriesNumber
    assert output_identity("1.2.3", 2, ResultKind.SR).series_description == \
        "spine-node v2 fracture report SR"


def test_label_map_off_the_source_grid_is_refused(case):
    series, result, _out = case
    shifted = sitk.Image(result.label_map)
    shifted.SetOrigin([o + 0.9 for o in result.label_map.GetOrigin()])
    with pytest.raises(ValueError, match="not a slice of the label map"):
        label_frames(shifted, series.headers)


def test_colours_tell_fractures_and_neighbouring_levels_apart_and_are_not_bone(case):
    """Recommended Display CIELab Values (issue 26): a fractured vertebra red; normal ones far
    from bone white and from red, neighbours visibly different (CIE76 delta E > 25)."""
    _series, result, out = case
    lab = {s.SegmentLabel: np.array(hd.color.CIELabColor.from_dicom_value(
        s.RecommendedDisplayCIELabValue).lab) for s in out.seg.SegmentSequence}
    red = np.array(hd.color.CIELabColor.from_rgb(255, 0, 0).lab)
    white = np.array(hd.color.CIELabColor.from_rgb(255, 255, 255).lab)
    fractured = {f.name for f in result.vertebrae if f.fractured}
    assert fractured == {"L1"}
    names = [f.name for f in result.vertebrae]
    for name in names:
        if name in fractured:
            assert np.linalg.norm(lab[name] - red) < 1
        else:
            assert np.linalg.norm(lab[name] - red) > 60, name
            assert np.linalg.norm(lab[name] - white) > 40, name
            assert np.hypot(lab[name][1], lab[name][2]) > 40, f"{name} is greyish"
    for a, b in zip(names, names[1:]):
        assert np.linalg.norm(lab[a] - lab[b]) > 25, (a, b)
