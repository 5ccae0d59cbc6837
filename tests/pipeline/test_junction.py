"""The lumbosacral junction classifier (pipeline/junction): its decision rule, the query points
and targets of a training volume, the crops, the chain completed with a missed last vertebra,
the numbering it anchors, a short training run, and the shipped weights on the train side's
real CT (where the shared real data is present)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.junction.chain import with_missed_last
from pipeline.junction.crops import CROP, crop
from pipeline.junction.infer import Junction, decide
from pipeline.junction.volumes import JunctionVolume, make_volume, queries
from pipeline.levels import BY_NAME, LEVELS
from pipeline.localization.infer import LocalizedVertebra

torch.set_num_threads(1)

REAL = Path(__file__).resolve().parents[2].parent / "shared/data/real-spine"
needs_real = pytest.mark.skipif(not (REAL / "totalseg-example").exists(),
                                reason="shared real-spine data absent")


def row(name: str) -> int:
    return LEVELS.index(BY_NAME[name])


def volume(names: list[str], s1: bool) -> JunctionVolume:
    """A blank 4 mm volume with vertebrae 8 voxels apart down the middle, the last at z = 20
    (and S1 at z = 12)."""
    centers = np.full((len(LEVELS), 3), np.nan)
    for i, n in enumerate(names):
        centers[row(n)] = (20 + 8 * (len(names) - 1 - i), 20, 20)
    return JunctionVolume("t", np.zeros((60, 40, 40), np.int16), centers,
                          np.array([12.0, 20, 20]) if s1 else np.full(3, np.nan))


@pytest.mark.parametrize("p_last, p_below, state", [
    (0.9, 0.1, "last"), (0.6, 0.9, "below"), (0.9, 0.95, "below"), (0.3, 0.2, "none"),
    (0.49, 0.49, "none")])
def test_the_decision_rule(p_last, p_below, state):
    assert decide(p_last, p_below, 0.5) == state


def test_queries_mark_only_the_last_vertebra_above_a_sacrum_in_view():
    qs = queries(volume(["L3", "L4", "L5"], s1=True))
    assert [q.target for q in qs] == [0, 0, 1, 0, 0]        # L3, L4, L5, S1, below S1
    assert [q.hard for q in qs] == [False, True, False, True, True]
    assert np.allclose(qs[3].point, (12, 20, 20)) and np.allclose(qs[4].point, (4, 20, 20))
    qs = queries(volume(["L3", "L4", "L5"], s1=False))      # the field ends below L5
    assert [q.target for q in qs] == [0, 0, 0, 0] and qs[2].hard


def test_a_crop_holds_the_vertebra_and_what_lies_below_it():
    hu = np.full((60, 40, 40), -1000, np.int16)
    hu[8:12, 18:23, 18:23] = 1000                          # bone 12-28 mm below the point
    c = crop(hu, np.array([20.0, 20, 20]))
    assert c.shape == (CROP,) * 3
    z = np.nonzero(c.max(axis=(1, 2)) > 1.0)[0]
    centre = (CROP - 1) / 2.0
    # the point sits BELOW_MM (4 voxels) above the crop's centre; the bone 8-12 voxels below it
    assert z.min() >= centre + 4 - 12 - 1 and z.max() <= centre + 4 - 8 + 1
    turned = crop(hu, np.array([20.0, 20, 20]), rotation=np.eye(3))
    assert np.array_equal(turned, c)


def test_make_volume_keeps_the_centroids_and_s1_in_voxel_indices():
    img = sitk.Image(30, 30, 40, sitk.sitkFloat32)
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetOrigin((0.0, 0.0, 0.0))
    vol = make_volume("t", img, {BY_NAME["L5"].label: (30.0, 30.0, 40.0)}, (30.0, 30.0, 4.0))
    assert vol.hu.shape == (20, 15, 15)
    assert np.allclose(vol.centers[row("L5")], (9.5, 7, 7), atol=0.6)
    assert vol.s1[0] < vol.centers[row("L5"), 0]
    assert LEVELS[vol.last_mobile()].name == "L5"
    far = make_volume("t", img, {BY_NAME["L5"].label: (30.0, 30.0, 40.0)}, (30.0, 30.0, -30.0))
    assert np.isnan(far.s1).all()                            # S1 beyond the field of view


def found(names: list[str]) -> list[LocalizedVertebra]:
    return [LocalizedVertebra(BY_NAME[n].label, n, (0.0, 0.0, -30.0 * i), 1.0)
            for i, n in enumerate(names)]


def below(p: float = 0.9) -> Junction:
    return Junction("below", 0.1, p, (0.0, 0.0, -999.0), 0.5)


def test_a_missed_last_vertebra_joins_the_chain_with_the_next_name():
    chain = with_missed_last(found(["L2", "L3", "L4"]), below())
    assert [v.name for v in chain] == ["L2", "L3", "L4", "L5"]
    assert [v.label for v in chain] == [BY_NAME[n].label for n in ("L2", "L3", "L4", "L5")]
    assert chain[-1].centroid_mm == (0.0, 0.0, -999.0) and chain[-1].score == 0.9
    assert [v.found_by for v in chain] == ["localizer"] * 3 + ["junction"]


def test_a_chain_ending_at_l5_moves_up_one_level_to_make_room():
    chain = with_missed_last(found(["L3", "L4", "L5"]), below())
    assert [v.name for v in chain] == ["L2", "L3", "L4", "L5"]


@pytest.mark.parametrize("names, junction", [
    (["L3", "L4", "L5"], Junction("last", 0.9, 0.1, (0, 0, -90.0), 0.5)),
    (["L4", "L5", "L6"], below()),                          # a variant name: left alone
    (["C1", "C2", "C3"], Junction("none", 0.1, 0.1, (0, 0, -90.0), 0.5)),
])
def test_the_chain_is_unchanged_unless_a_vertebra_is_missed(names, junction):
    assert [v.name for v in with_missed_last(found(names), junction)] == names


def test_a_junction_anchors_l5_where_the_field_is_too_narrow_for_the_sacrum_test():
    from pipeline.anchors import find_numbering
    from tests.pipeline.test_anchors import detected, spine_volume

    names = ["L1", "L2", "L3", "L4", "L5"]
    img, cents = spine_volume(names, sacrum=False, half_width_mm=50.0)
    wrong = detected(names, cents, -1)                      # named T12-L4
    assert find_numbering(img, wrong).status == "uncertain"
    num = find_numbering(img, wrong, Junction("last", 0.97, 0.02, (0, 0, -30.0), 0.5))
    assert num.status == "anchored" and num.names == tuple(names) and num.shift == 1
    assert "junction classifier" in num.reason
    num = find_numbering(img, wrong, Junction("none", 0.2, 0.1, (0, 0, -30.0), 0.5))
    assert num.status == "uncertain"


def test_the_sacrum_test_that_sees_no_sacrum_overrules_the_junction():
    from pipeline.anchors import find_numbering
    from tests.pipeline.test_anchors import detected, spine_volume

    names = ["L1", "L2", "L3", "L4", "L5"]
    img, cents = spine_volume(names, sacrum=False, half_width_mm=130.0)
    num = find_numbering(img, detected(names, cents), Junction("last", 0.97, 0.0, (0, 0, 0), 0.5))
    assert num.status == "uncertain" and "junction classifier" in num.reason


@needs_real
def test_a_short_training_run_writes_weights_with_a_threshold(tmp_path):
    from pipeline.junction.train import install, train
    from pipeline.junction.train_config import JunctionTrainConfig
    from pipeline.registry import load_model

    cfg = JunctionTrainConfig(data=str(REAL), synth_cases=2, phantom_seeds="1", val_synth_cases=1,
                              real_subjects="sub-verse006", real_repeat=2, steps=4, batch=4,
                              val_every=2, width=4, out=str(tmp_path / "run"),
                              cache=str(tmp_path / "cache"), threads=1)
    best = train(cfg, log=lambda s: None)
    ck = torch.load(best, map_location="cpu", weights_only=False)
    assert 0.5 <= ck["threshold"] <= 0.99 and ck["step"] in (2, 4)
    assert set(ck["threshold_report"]) == {"trials", "fixable", "right", "wrong", "abstained"}
    path = install(best, tmp_path / "weights")
    model = load_model("junction", "cpu", weights_dir=tmp_path / "weights")
    assert path.exists() and model.meta["threshold"] == ck["threshold"]
    assert model(torch.zeros(1, 1, CROP, CROP, CROP)).shape == (1,)


@needs_real
def test_a_synthesised_volume_records_where_its_sacrum_is():
    from pipeline.junction.volumes import synth_volume
    from pipeline.synthesis.generate import SynthOptions
    from pipeline.synthesis.seg_source import find_masks

    mask = next(m for m in find_masks(REAL, ["sub-verse010"]))
    options = SynthOptions().with_scene(sacrum=1.0)
    vol = synth_volume(mask, np.random.default_rng(3), "t", options, keep_last=True)
    l5 = vol.centers[row("L5")]
    assert not np.isnan(l5).any() and not np.isnan(vol.s1).any()
    assert 4.0 <= l5[0] - vol.s1[0] <= 14.0                  # 16-56 mm below L5, on the 4 mm grid
    assert [q.target for q in queries(vol)].count(1) == 1


@needs_real
def test_validation_subjects_never_become_training_volumes():
    from pipeline.junction.volumes import real_volumes

    with pytest.raises(ValueError, match="train side"):
        real_volumes(REAL, ["sub-verse008"])


@needs_real
def test_the_shipped_classifier_finds_the_junction_of_a_training_ct():
    """totalseg-example (train side, its S1 labelled): the shipped weights call its L5 the last
    mobile vertebra, find the L5 missing from a chain that ends at L4, and fix nothing for a
    chain that ends at L2 (two vertebrae above the sacrum)."""
    from pipeline.junction.infer import find_junction
    from pipeline.realdata.pack import iter_pack_cases
    from pipeline.realdata.truth import axial_lps, truth_vertebrae
    from pipeline.registry import read_manifest

    if "junction" not in read_manifest():
        pytest.skip("junction weights not installed")
    case = next(iter_pack_cases(REAL, ["totalseg-example"]))
    ct = axial_lps(case.ct)
    truth = sorted(truth_vertebrae(case, axial_lps(case.mask)), key=lambda v: -v["centroid_mm"][2])
    cents = [v["centroid_mm"] for v in truth]
    assert [v["name"] for v in truth][-1] == "L5"
    assert find_junction(ct, cents, 34.0).state == "last"
    below = find_junction(ct, cents[:-1], 34.0)
    assert below.state == "below"
    assert np.linalg.norm(np.array(below.below_mm) - np.array(cents[-1])) < 15.0
    assert find_junction(ct, cents[:-3], 34.0).state == "none"


def test_synth_options_change_only_the_scene_asked():
    """``SynthOptions.with_scene``, which the junction trainer's ``--myelography`` uses: 0
    synthesises with the defaults (the cached volumes of earlier runs stay valid), a share sets
    the scene's chance of canal contrast and nothing else."""
    from pipeline.synthesis.generate import SynthOptions

    assert SynthOptions().with_scene(myelography=0.0) == SynthOptions()
    opts = SynthOptions().with_scene(myelography=0.3)
    assert opts.render.scene.myelography == 0.3
    assert opts.pose == SynthOptions().pose and opts.render.noise_hu == SynthOptions().render.noise_hu
    assert opts.render.scene.sacrum == SynthOptions().render.scene.sacrum


def test_scores_do_not_depend_on_the_patients_side():
    """The score is the mean over a crop and its left-right mirror: a mirrored volume, asked at
    the mirrored points, scores the same (for any weights), and the score differs from the
    plain crop's where the weights are not symmetric."""
    from pipeline.junction.infer import scores
    from pipeline.junction.net import build_junction

    torch.manual_seed(0)
    model = build_junction(4).eval()
    rng = np.random.default_rng(1)
    hu = rng.normal(0, 300, (30, 28, 26)).astype(np.float32)
    pts = [np.array([15.0, 14.0, 10.0]), np.array([12.0, 13.5, 16.5])]
    mirrored = [np.array([p[0], p[1], hu.shape[2] - 1 - p[2]]) for p in pts]
    a = scores(model, hu, pts)
    b = scores(model, np.ascontiguousarray(hu[:, :, ::-1]), mirrored)
    assert np.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        plain = torch.sigmoid(model(torch.from_numpy(np.stack([crop(hu, p) for p in pts])[:, None])))
    assert not np.allclose(a, plain.numpy(), atol=1e-6)
