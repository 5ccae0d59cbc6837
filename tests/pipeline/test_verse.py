"""The VerSe-layout loader: both file-name conventions, the phantom's export, and the centroid
convention (1 mm voxels in the file's direction codes) checked against nibabel's reorientation."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.phantom import generate
from pipeline.phantom.writer import write_verse
from pipeline.verse import (
    VerseError,
    ctd_to_lps,
    iter_verse_cases,
    load_verse_case,
    lps_to_ctd,
    read_centroids,
    write_centroids,
)


def _image(direction, spacing=(0.8, 1.1, 2.5), size=(20, 24, 16), origin=(12.0, -30.0, 100.0)):
    img = sitk.Image(list(size), sitk.sitkInt16)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection([float(v) for v in np.array(direction, float).flatten()])
    return img


DIRECTIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "FFS": np.diag([-1.0, 1.0, -1.0]),
    "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # columns: P, I, R
}


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@pytest.mark.parametrize("codes", [("P", "I", "R"), ("I", "P", "L"), ("R", "A", "S"), ("L", "P", "S")])
def test_centroid_convention_agrees_with_nibabel(tmp_path, name, codes):
    img = _image(DIRECTIONS[name])
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(img, str(path))
    img = sitk.ReadImage(str(path))
    ijk = (13.0, 5.5, 7.25)
    lps = np.array(img.TransformContinuousIndexToPhysicalPoint(ijk))
    # independent: nibabel reorients the image to `codes`; X, Y, Z = reoriented voxel * zoom
    nimg = nib.load(str(path))
    tr = nib.orientations.ornt_transform(nib.orientations.io_orientation(nimg.affine),
                                         nib.orientations.axcodes2ornt(codes))
    re = nimg.as_reoriented(tr)
    ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
    vox = np.linalg.solve(re.affine, ras)[:3]
    expected = vox * np.array(re.header.get_zooms()[:3])
    got = lps_to_ctd(lps, codes, img)
    assert np.allclose(got, expected, atol=1e-3), (got, expected)
    assert np.allclose(ctd_to_lps(got, codes, img), lps, atol=1e-3)


def test_phantom_export_round_trips_through_the_loader(tmp_path):
    ph = generate(5, levels="T12-L2", fractures="none",
                  acquisition={"matrix": 96, "pixel_spacing": 1.0, "slice_spacing": 2.0, "head_first": False})
    write_verse(ph, tmp_path / "verse")
    case = load_verse_case(tmp_path / "verse")
    assert case.mask is not None
    assert np.array_equal(sitk.GetArrayViewFromImage(case.mask), sitk.GetArrayViewFromImage(ph.labels))
    assert np.array_equal(sitk.GetArrayViewFromImage(case.ct), sitk.GetArrayViewFromImage(ph.ct))
    voxel = max(ph.ct.GetSpacing())
    gt = {v["label"]: v["centroid_mm"] for v in ph.gt["vertebrae"]}
    assert set(case.centroids_mm) == set(gt)
    for lab, c in gt.items():
        assert np.linalg.norm(np.subtract(case.centroids_mm[lab], c)) < voxel, lab
        assert np.linalg.norm(np.subtract(case.centroids_mm[lab], c)) < 1e-2  # in fact exact
    codes, raw = read_centroids(tmp_path / "verse" / "ctd.json")
    assert codes == ("P", "I", "R") and set(raw) == set(gt)


def _case_files(ct_path, mask_path, ctd_path, codes=("P", "I", "R")):
    img = _image(DIRECTIONS["RAS"], size=(12, 12, 10))
    arr = np.zeros((10, 12, 12), np.uint8)
    arr[3:6, 4:8, 5:9] = 20
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(img)
    for p in (ct_path, mask_path, ctd_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(ct_path))
    sitk.WriteImage(mask, str(mask_path))
    c = mask.TransformContinuousIndexToPhysicalPoint((6.5, 5.5, 4.0))
    write_centroids(ctd_path, codes, {20: lps_to_ctd(c, codes, mask)})
    return c


def test_verse20_bids_layout_is_found(tmp_path):
    root = tmp_path / "verse20"
    c = _case_files(root / "rawdata" / "sub-verse004" / "sub-verse004_ct.nii.gz",
                    root / "derivatives" / "sub-verse004" / "sub-verse004_seg-vert_msk.nii.gz",
                    root / "derivatives" / "sub-verse004" / "sub-verse004_seg-subreg_ctd.json")
    cases = list(iter_verse_cases(root))
    assert len(cases) == 1
    assert cases[0].case_id == "sub-verse004" and cases[0].mask is not None
    assert np.allclose(cases[0].centroids_mm[20], c, atol=1e-3)


def test_verse19_flat_layout_is_found(tmp_path):
    root = tmp_path / "verse19"
    c = _case_files(root / "verse004.nii.gz", root / "verse004_seg.nii.gz", root / "verse004_ctd.json",
                    codes=("I", "P", "L"))
    _case_files(root / "verse005.nii.gz", root / "verse005_seg.nii.gz", root / "verse005_ctd.json")
    cases = list(iter_verse_cases(root))
    assert [k.case_id for k in cases] == ["verse004", "verse005"]
    assert np.allclose(cases[0].centroids_mm[20], c, atol=1e-3)


def test_nan_centroids_are_skipped_and_a_missing_direction_is_an_error(tmp_path):
    p = tmp_path / "ctd.json"
    p.write_text(json.dumps([{"direction": ["P", "I", "R"]}, {"label": 20, "X": 1.0, "Y": 2.0, "Z": 3.0},
                             {"label": 21, "X": "NaN", "Y": "NaN", "Z": "NaN"}]))
    codes, raw = read_centroids(p)
    assert codes == ("P", "I", "R") and set(raw) == {20}
    p.write_text(json.dumps([{"label": 20, "X": 1.0, "Y": 2.0, "Z": 3.0}]))
    with pytest.raises(VerseError, match="direction"):
        read_centroids(p)
