"""The key image (DESIGN.md "Outputs", contract): an RGB Secondary Capture any PACS shows,
fractured vertebrae red, normal white, marked not for primary diagnosis."""
from __future__ import annotations

from pipeline.findings import GenantGrade, Morphology, VertebraFinding
from pipeline.outputs.key_image import _caption, reformat_sagittal, render
from tests import synthetic_results as synth


def test_key_image_passes_dciodvfy_without_errors(case, tmp_path):
    errors, output = synth.dciodvfy_errors(case[2].key_image, tmp_path / "key.dcm")
    assert errors == [], output


def test_key_image_is_plain_rgb_secondary_capture_marked_not_for_diagnosis(case):
    ds = case[2].key_image
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # every PACS decodes it
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert ds.BurnedInAnnotation == "YES"
    assert "NOT FOR PRIMARY DIAGNOSIS" in ds.ImageComments
    assert list(ds.PatientOrientation) == ["P", "F"]
    assert ds.ImageType[:2] == ["DERIVED", "SECONDARY"]
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns, 3)


def _red(rgb):
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > 180) & (g < 130) & (b < 130)


def test_fractured_vertebra_is_red_and_normal_ones_are_not(case):
    series, result, _out = case
    hu, labels, pixel_mm, (z_top, _y) = reformat_sagittal(series.image, result.label_map,
                                                          result.vertebrae)
    rgb, top = render(hu, labels, result.vertebrae, pixel_mm, z_top, "test")
    plane = rgb[top:top + hu.shape[0], :hu.shape[1]]
    for f in result.vertebrae:
        mask = labels == f.label
        assert mask.sum() > 50, f"{f.name} is not in the mid-sagittal plane"
        red_fraction = _red(plane[mask]).mean()
        if f.fractured:
            assert red_fraction > 0.9, f.name
        else:
            assert red_fraction == 0.0, f.name
            assert plane[mask].mean() > 150, f.name     # tinted white over bone
    # The captions sit in the panel right of the plane: red for the fracture only.
    panel = rgb[:, hu.shape[1]:]
    assert _red(panel).any()


def test_caption_names_level_grade_and_morphology():
    f = VertebraFinding(label=20, name="L1", centroid_mm=(0, 0, 0), fractured=True,
                        genant_grade=GenantGrade.SEVERE, morphology=Morphology.CRUSH)
    assert _caption(f) == "L1  G3 severe crush"
    n = VertebraFinding(label=21, name="L2", centroid_mm=(0, 0, 0), partial=True)
    assert _caption(n) == "L2  G0 normal (partial)"

