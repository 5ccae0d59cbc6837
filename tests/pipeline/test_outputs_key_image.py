"""The key image (DESIGN.md "Outputs", contract): an RGB Secondary Capture any PACS shows,
fractured vertebrae red, normal white, marked not for primary diagnosis."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.findings import GenantGrade, Morphology, VertebraFinding
from pipeline.numbering import Numbering
from pipeline.outputs import build_outputs
from pipeline.outputs.key_image import (
    WARNING_COLOUR,
    _caption,
    _font,
    _text_width,
    caption_rows,
    reformat_sagittal,
    render,
    wrap,
)
from tests.helpers import synthetic_results as synth


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


def _orange(rgb):
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (np.abs(r - WARNING_COLOUR[0]) < 40) & (np.abs(g - WARNING_COLOUR[1]) < 40) \
        & (b < 80)


def test_uncertain_numbering_is_written_on_the_key_image(case, tmp_path):
    series, result, out = case
    reason = "ribs not assessable (field of view too narrow beside the spine)"
    uncertain = dataclasses.replace(result, numbering=Numbering("uncertain", reason))
    warned = build_outputs(series, uncertain, version=1).key_image
    header = warned.pixel_array[: warned.Rows // 4]
    assert _orange(header).sum() > 50                      # the warning, written in orange
    assert not _orange(out.key_image.pixel_array[: out.key_image.Rows // 4]).any()
    assert warned.Rows > out.key_image.Rows                # room made for it above the plane
    assert f"Vertebral level numbering uncertain: {reason}" in warned.ImageComments
    errors, output = synth.dciodvfy_errors(warned, tmp_path / "key.dcm")
    assert errors == [], output


def test_anchored_numbering_writes_no_warning(case):
    series, result, out = case
    anchored = dataclasses.replace(result, numbering=Numbering("anchored", "sacrum below L5"))
    key = build_outputs(series, anchored, version=1).key_image
    assert not _orange(key.pixel_array).any()
    assert "numbering" not in key.ImageComments
    assert key.Rows == out.key_image.Rows


def test_render_puts_the_warning_between_banner_and_plane():
    hu = np.zeros((200, 120), np.float32)
    labels = np.zeros((200, 120), np.int32)
    plain, top0 = render(hu, labels, [], 1.0, 0.0, "banner")
    warned, top1 = render(hu, labels, [], 1.0, 0.0, "banner", "NUMBERING UNCERTAIN: " + "x " * 80)
    assert top1 > top0 and warned.shape[0] > plain.shape[0]
    assert _orange(warned[:top1]).any() and not _orange(warned[top1:]).any()


def test_wrap_keeps_every_line_within_the_width():
    font = _font(12)
    text = "Vertebral level numbering uncertain: no rib-bearing to rib-free transition, no " \
           "sacrum and no C2 in the field of view"
    lines = wrap(font, text, 150)
    assert " ".join(lines) == text and len(lines) > 1
    assert all(_text_width(font, line) <= 150 for line in lines if " " in line)


def test_a_vertebra_not_assessed_is_outlined_neither_red_nor_tinted_white(case):
    series, result, _out = case
    vertebrae = [dataclasses.replace(v) for v in result.vertebrae]
    vertebrae[2].partial = True                      # L2: as if cut by the field of view
    hu, labels, pixel_mm, (z_top, _y) = reformat_sagittal(series.image, result.label_map,
                                                          vertebrae)
    tinted, top = render(hu, labels, result.vertebrae, pixel_mm, z_top, "test")
    shown, top2 = render(hu, labels, vertebrae, pixel_mm, z_top, "test")
    mask = labels == vertebrae[2].label
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=2)
    plane = shown[top2:top2 + hu.shape[0], :hu.shape[1]]
    before = tinted[top:top + hu.shape[0], :hu.shape[1]]
    assert not _red(plane[mask]).any()
    assert plane[inner].mean() < before[inner].mean() - 20    # no white tint inside
    edge = plane[mask & ~ndimage.binary_erosion(mask)].astype(int)
    assert (edge[:, 2] > edge[:, 0]).mean() > 0.9              # a blue-grey outline
