"""Real-data loaders, the subject split and ``evaluate --data`` (issue 24).

The pack (``../shared/data/real-spine``) is read where it is present; the tests that need it
skip cleanly where it is absent. The layouts themselves are checked on small files made here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.realdata import pack as rp
from pipeline.realdata.split import SPLIT_FILE, load_split
from pipeline.realdata.truth import axial_lps, truth_vertebrae

PACK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real-spine"
needs_pack = pytest.mark.skipif(not (PACK / "grades.json").exists(),
                                reason="the real-spine pack (../shared/data/real-spine) is absent")


def _image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _spine_mask(levels=(20, 21, 22), shape=(60, 30, 30)) -> np.ndarray:
    """Boxes stacked along z (array axis 0), cranial level on top (highest z)."""
    m = np.zeros(shape, np.uint8)
    for k, lab in enumerate(levels):
        z1 = shape[0] - 4 - k * 18
        m[z1 - 14:z1, 8:22, 8:22] = lab
    return m


def test_split_file_keeps_subjects_apart():
    split = load_split()
    assert split.train and split.validation
    assert not set(split.train) & set(split.validation)
    assert split.side_of(split.validation[0]) == "validation"
    assert split.side_of("no-such-subject") is None
    with pytest.raises(ValueError, match="unknown split side"):
        split.side("test")


def test_split_refuses_a_subject_on_both_sides(tmp_path):
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": ["a", "b"], "validation": ["b"]}))
    with pytest.raises(ValueError, match="both sides.*b"):
        load_split(bad)


@needs_pack
def test_every_pack_subject_is_on_one_side_and_validation_has_ct():
    split = load_split()
    subjects = {p.name for p in PACK.iterdir() if p.is_dir()}
    assert subjects == set(split.train) | set(split.validation), SPLIT_FILE
    val_cases = list(rp.iter_pack_cases(PACK, list(split.validation)))
    assert {c.subject for c in val_cases} == set(split.validation)
    for c in val_cases:
        assert c.mask.GetSize() == c.ct.GetSize()
        assert c.labels, c.case_id


@needs_pack
def test_pack_grades_map_the_cohorts_codes():
    grades = rp.read_pack_grades(PACK)
    # VerSe'19 copy: sub-verse008 L2 (label 21) grade 2
    assert grades["sub-verse008"][21] == 2
    # FX-Grader code 6 (sclerotic, not a fracture) counts as grade 0
    assert grades["sub-ctfu00001_ses-20080508_ce-no"][22] == 0


def test_totalsegmentator_ids_become_verse_labels(tmp_path):
    """TotalSegmentator v2: 27 L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1; 25/26 dropped."""
    arr = np.zeros((4, 4, 8), np.uint8)
    for k, ts in enumerate((25, 26, 27, 31, 32, 43, 44, 50)):
        arr[:, :, k] = ts
    out = sitk.GetArrayFromImage(rp._verse_labels(_image(arr), "totalseg"))
    assert [int(out[0, 0, k]) for k in range(8)] == [0, 0, 24, 20, 19, 8, 7, 1]


def test_folder_of_verse_cases_reads_ct_mask_and_grades(tmp_path):
    mask = _spine_mask()
    ct = np.where(mask > 0, 400.0, -50.0).astype(np.float32)
    # PIR-like storage: direction flips, as the VerSe files have
    direction = (0, 0, -1, 1, 0, 0, 0, -1, 0)
    case = tmp_path / "rawdata" / "sub-x01"
    deriv = tmp_path / "derivatives" / "sub-x01"
    case.mkdir(parents=True)
    deriv.mkdir(parents=True)
    sitk.WriteImage(_image(ct, direction=direction), str(case / "sub-x01_ct.nii.gz"))
    sitk.WriteImage(_image(mask, direction=direction), str(deriv / "sub-x01_seg-vert_msk.nii.gz"))
    (tmp_path / "grades.json").write_text(json.dumps({"sub-x01": {"L2": 3, "L3": 0, "L9": 1}}))
    cases = list(rp.iter_folder_cases(tmp_path))
    assert [c.case_id for c in cases] == ["sub-x01"]
    c = cases[0]
    assert c.labels == [20, 21, 22]
    assert c.grades == {21: 3, 22: 0}
    truth = truth_vertebrae(c, axial_lps(c.mask))
    assert [v["name"] for v in truth] == ["L1", "L2", "L3"]
    assert all(not v["partial"] for v in truth)
    assert [v["genant_grade"] for v in truth] == [None, 3, 0]


def test_folder_without_cases_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(rp.VerseError, match="no case"):
        list(rp.iter_folder_cases(tmp_path))


def test_vertebra_cut_by_the_field_of_view_is_partial():
    mask = _spine_mask()
    mask[-1, 10:20, 10:20] = 20            # the cranial vertebra reaches the last slice
    mask[1:3, 10:12, 10:12] = 23           # a sliver at the bottom
    case = rp.RealCase("s", "s", _image(mask.astype(np.float32)), _image(mask), {})
    case.centroids_mm = {int(k): v for k, v in
                         rp.centroids_from_mask(_image(mask)).items()}
    truth = {v["name"]: v for v in truth_vertebrae(case, axial_lps(case.mask))}
    assert truth["L1"]["partial_reason"] == "cut by the field of view"
    assert truth["L4"]["partial_reason"] == "sliver"
    assert not truth["L2"]["partial"] and not truth["L3"]["partial"]


@needs_pack
def test_trainers_see_only_the_train_side_of_the_pack():
    """Every real source a trainer reads (CT cases, masks for synthesis) is on the train side."""
    from pipeline.realdata.samples import training_cases
    from pipeline.synthesis.seg_source import find_masks, training_subjects

    split = load_split()
    key, cases = training_cases(PACK)
    subjects = {c.subject for c in cases()}
    assert subjects and subjects <= set(split.train), subjects
    assert set(training_subjects()) == set(split.train)
    masks = find_masks(PACK, training_subjects())
    assert masks and {m.subject for m in masks} <= set(split.train)


@needs_pack
@pytest.mark.slow
def test_a_synthesised_localization_case_has_its_levels(tmp_path):
    """One whole volume synthesised from a real training mask, prepared for the localization
    network: the mask's levels are there, on the network's grid, and the cache returns it."""
    from pipeline.synthesis.loc_source import cached_synth_cases

    cases = cached_synth_cases(PACK, 1, 4.0, tmp_path, seed=3)
    again = cached_synth_cases(PACK, 1, 4.0, tmp_path, seed=3)
    c = cases[0]
    present = [k for k in range(len(c.centers)) if not np.isnan(c.centers[k, 0])]
    assert len(present) >= 2
    assert np.array_equal(c.array, again[0].array)
    shape = np.array(c.array.shape)
    assert np.all(c.centers[present] >= -0.5) and np.all(c.centers[present] <= shape - 0.5)
    assert float(c.array.max()) > float(np.median(c.array)), "no bone brighter than background"
