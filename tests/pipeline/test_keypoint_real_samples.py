"""Keypoint training planes from real CT with expert masks (a VerSe-layout folder): the six points
are placed on each mask's body section, and `train keypoints --real-data` reads them."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.keypoints.plane import PLANE_SPACING_MM
from pipeline.keypoints.real_samples import cached_real_keypoint_samples, real_keypoint_samples
from pipeline.realdata.pack import iter_folder_cases
from tests.pipeline.synthetic import box_spine

HEIGHTS = {"L2": (16.0, 20.0, 24.0)}


@pytest.fixture()
def verse_folder(tmp_path):
    """A box spine written as one VerSe case (CT, vertebra mask, grades)."""
    ct, labels, _gt = box_spine(levels=("L1", "L2", "L3"), heights=HEIGHTS)
    raw, deriv = tmp_path / "rawdata" / "sub-box", tmp_path / "derivatives" / "sub-box"
    raw.mkdir(parents=True)
    deriv.mkdir(parents=True)
    sitk.WriteImage(ct, str(raw / "sub-box_ct.nii.gz"))
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8), str(deriv / "sub-box_seg-vert_msk.nii.gz"))
    (tmp_path / "grades.json").write_text('{"sub-box": {"L2": 2}}')
    return tmp_path


def _heights(points: np.ndarray) -> tuple[float, ...]:
    return tuple(float(np.linalg.norm(points[a] - points[b])) * PLANE_SPACING_MM
                 for a, b in ((0, 1), (2, 3), (4, 5)))


def test_points_lie_on_the_mask_bodies_endplates(verse_folder):
    s = real_keypoint_samples(iter_folder_cases(verse_folder), n_aug=2)
    assert s.inputs.shape == (6, 2, 96, 96) and s.points.shape == (6, 6, 2)
    assert [n.rsplit("/", 1)[1] for n in s.names[::2]] == ["L1", "L2", "L3"]
    assert s.grades.tolist() == [0, 0, 2, 2, 0, 0]
    # unjittered planes: the box bodies' heights, the wedge of L2 included (the points sit at
    # +-0.88 of the endplate's half length, so inside the 16 -> 24 mm slope)
    l1, l2 = _heights(s.points[0]), _heights(s.points[2])
    assert l1 == pytest.approx((24.0, 24.0, 24.0), abs=1.2)
    assert l2[0] < l2[1] < l2[2] and l2[1] == pytest.approx(20.0, abs=1.2)
    assert 16.0 - 1.2 < l2[0] < 18.5 and 21.5 < l2[2] < 24.0 + 1.2
    # the mask channel is the vertebra's own occupancy
    assert s.inputs[0, 1].max() == pytest.approx(1.0) and s.inputs[0, 1].min() == 0.0


def test_real_planes_are_cached_by_their_source(verse_folder, tmp_path):
    cache = tmp_path / "cache"
    a = cached_real_keypoint_samples(verse_folder, cache, n_aug=1)
    assert len(list(cache.glob("kp-real-*.npz"))) == 1
    b = cached_real_keypoint_samples(verse_folder, cache, n_aug=1)
    assert np.array_equal(a.points, b.points) and len(a.inputs) == 3


def test_a_folder_without_a_body_section_is_a_clear_error(tmp_path):
    raw, deriv = tmp_path / "rawdata" / "sub-e", tmp_path / "derivatives" / "sub-e"
    raw.mkdir(parents=True)
    deriv.mkdir(parents=True)
    zeros = sitk.Image([20, 20, 20], sitk.sitkInt16)
    sitk.WriteImage(zeros, str(raw / "sub-e_ct.nii.gz"))
    sitk.WriteImage(sitk.Cast(zeros, sitk.sitkUInt8), str(deriv / "sub-e_seg-vert_msk.nii.gz"))
    with pytest.raises(ValueError, match="no keypoint planes"):
        real_keypoint_samples(iter_folder_cases(tmp_path), n_aug=1)


def test_train_keypoints_reads_real_data(verse_folder, tmp_path):
    """Real planes in the draw; checkpoints scored on phantom and synthesised planes."""
    from typer.testing import CliRunner

    from dicom_node.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "keypoints", "--seeds", "101", "--val-seeds", "8001",
                                 "--steps", "2", "--base", "4", "--real-data", str(verse_folder),
                                 "--real-repeat", "2", "--out", str(out),
                                 "--cache", str(tmp_path / "cache"),
                                 "--synth-from", str(verse_folder), "--synth-cases", "1",
                                 "--val-synth-cases", "1", "--val-synth-seed", "5"])
    assert r.exit_code == 0, r.output
    assert "18 real planes" in r.output and "each drawn 2x" in r.output
    assert "synthesised validation planes (seed 5)" in r.output
    val = [line for line in r.output.splitlines() if line.startswith("val step")]
    assert val and " | phantom " in val[-1] and " | synth " in val[-1]
    assert (out / "best.pt").exists()


def test_planes_of_ct_synthesised_from_masks_carry_points_and_grades(tmp_path):
    from pipeline.keypoints.real_samples import synth_keypoint_samples
    from pipeline.synthesis.seg_source import find_masks

    _ct, labels, _gt = box_spine(levels=("T12", "L1", "L2", "L3", "L4"))
    subject = tmp_path / "sub-box"
    subject.mkdir()
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8), str(subject / "sub-box_seg-vert_msk.nii.gz"))
    masks = find_masks(tmp_path)
    s = synth_keypoint_samples(masks, cases=2, n_aug=2, seed=3, fractured_share=1.0)
    assert len(s.inputs) >= 2 and s.points.shape[1:] == (6, 2)
    assert all(str(n).startswith("synth-") for n in s.names)
    assert (s.grades > 0).any()                      # the first level of each case fractured
    for pts in s.points[::2]:                        # unjittered planes: plausible body heights
        assert all(5.0 < h < 30.0 for h in _heights(pts))


def test_checkpoints_are_scored_on_phantom_and_synthesised_planes_alike():
    import torch

    from pipeline.keypoints.dataset import KeypointSamples
    from pipeline.keypoints.train import build_keypoint_model, unjittered, validate, validate_groups

    rng = np.random.default_rng(0)

    def planes(names):
        n = len(names)
        return KeypointSamples(rng.normal(size=(n, 2, 32, 32)).astype(np.float32),
                               rng.uniform(8, 24, size=(n, 6, 2)), np.zeros(n, int), np.array(names))

    s = planes(["a", "a", "a", "b", "b", "c"])
    first = unjittered(s)
    assert list(first.names) == ["a", "b", "c"]
    assert np.array_equal(first.points, s.points[[0, 3, 5]])
    torch.manual_seed(0)
    model = build_keypoint_model(4, 2).eval()
    groups = {"phantom": planes(["p1", "p2"]), "synth": planes(["s1", "s2", "s3"])}
    v = validate_groups(model, groups, 0.75)
    own = {k: validate(model, g, 0.75) for k, g in groups.items()}
    assert v["groups"] == own
    # each group counts equally, whatever its number of planes
    assert v["point_error_mm"] == pytest.approx(
        (own["phantom"]["point_error_mm"] + own["synth"]["point_error_mm"]) / 2)


def test_train_keypoints_refuses_to_validate_on_the_training_planes_seed(tmp_path):
    from typer.testing import CliRunner

    from dicom_node.cli import app

    _ct, labels, _gt = box_spine(levels=("L1", "L2", "L3"))
    (tmp_path / "sub-box").mkdir()
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8),
                    str(tmp_path / "sub-box" / "sub-box_seg-vert_msk.nii.gz"))
    common = ["train", "keypoints", "--seeds", "101", "--val-seeds", "8001", "--steps", "2",
              "--base", "4", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
              "--val-synth-cases", "2"]
    r = CliRunner().invoke(app, common + ["--synth-from", str(tmp_path), "--seed", "7",
                                          "--val-synth-seed", "7"])
    assert r.exit_code != 0 and "training planes' seed" in str(r.exception or r.output)
    r = CliRunner().invoke(app, common)
    assert r.exit_code != 0 and "--synth-from" in str(r.exception or r.output)
    assert not (tmp_path / "cache").exists()        # refused before any phantom was generated
