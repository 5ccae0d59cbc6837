"""The key image (DESIGN.md "Outputs", contract): an RGB Secondary Capture any PACS shows,
fractured vertebrae red, normal white, marked not for primary diagnosis."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.findings import GenantGrade, Morphology, VertebraFinding
from pipeline.outputs.key_image import _caption, caption_rows, reformat_sagittal, render
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
    assert _caption(n) == "L2  partial, not graded"
    c2 = VertebraFinding(label=2, name="C2", centroid_mm=(0, 0, 0), grading_source="none")
    assert _caption(c2) == "C2  not graded"



@pytest.mark.parametrize("true_rows", [
    [10.0, 11.0, 12.0, 60.0],            # a partial vertebra cut at the top edge, then crowded
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],      # all above the column's first row
    [95.0, 96.0, 97.0, 98.0],            # crowded at the bottom edge
    [20.0, 40.0, 60.0],                  # room enough: captions stay at their vertebrae
])
def test_captions_never_overlap_even_at_the_edges(true_rows):
    lo, hi, gap = 7.0, 93.0, 13.8
    rows = caption_rows(true_rows, lo, hi, gap)
    assert all(b - a >= gap - 1e-9 for a, b in zip(rows, rows[1:]))
    assert lo - 1e-9 <= rows[0] and rows[-1] <= hi + 1e-9
    if true_rows == [20.0, 40.0, 60.0]:
        assert rows == true_rows


def test_key_image_grows_to_fit_many_captions_on_a_thin_slab(case):
    """Twenty vertebrae on a 40-row plane (a thin slab): the caption column gets taller."""
    import numpy as np

    hu = np.zeros((40, 60), np.float32)
    labels = np.zeros((40, 60), np.int32)
    findings = [dataclasses.replace(case[1].vertebrae[0], label=i + 1, name=f"T{i % 12 + 1}",
                                    centroid_mm=(0.0, 0.0, float(-i))) for i in range(20)]
    pixels, top = render(hu, labels, findings, pixel_mm=1.0, z_top=0.0, banner="test")
    assert pixels.shape[0] - top > 20 * 12 * 1.15 - 1   # 20 captions, 1.15 x 12 px apart
