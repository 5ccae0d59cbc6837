"""Vertebra localisation: M-SCN variants, targets, sampling, inference, plausibility, training."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.levels import BY_LABEL, BY_NAME, LEVELS, N_LEVELS
from pipeline.localization.dataset import Case, PatchSampler, make_case
from pipeline.localization.heatmaps import channel_peaks, gaussian_heatmaps
from pipeline.localization.infer import bone_bearing, decode, plausible_chain, predict_heatmaps
from pipeline.localization.train import TrainConfig, heatmap_loss, train
from pipeline.nets import MSCN, VARIANTS
from pipeline.preprocess import prepare
from pipeline.registry import build_from_checkpoint

torch.set_num_threads(1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dims,shape", [(3, (1, 1, 20, 17, 24)), (2, (2, 1, 40, 36))])
def test_every_ablation_variant_is_dimension_generic(variant, dims, shape):
    model = MSCN(spatial_dims=dims, out_channels=6, base=4, variant=variant)
    y = model(torch.randn(*shape))
    assert y.shape == (shape[0], 6) + shape[2:]
    assert MSCN(**model.config).config == model.config


def test_mscn_switches_override_the_variant():
    m = MSCN(out_channels=3, base=2, variant="lngn", attention=True)
    assert m.config["attention"] and not m.config["multi_filter"]
    with pytest.raises(ValueError):
        MSCN(variant="ln", multi_filter=True)


def test_subvoxel_peak_recovers_gaussian_centres():
    centres = np.array([[5.3, 7.71, 9.5], [np.nan] * 3, [2.0, 3.2, 12.9]])
    h = gaussian_heatmaps((12, 14, 16), centres, sigma=1.5).numpy()
    pos, val = channel_peaks(h)
    assert np.allclose(pos[[0, 2]], centres[[0, 2]], atol=1e-3)
    assert val[1] == 0 and val[0] > 0.8


def test_plausibility_keeps_anatomical_order_and_one_level_per_vertebra():
    def k(n):
        return BY_NAME[n].order
    # T12, L1, L2 caudal 30 mm apart; a spurious L4 above T12; a second "L3" on the L2 body.
    orders = [k("T12"), k("L1"), k("L2"), k("L4"), k("L3")]
    pos = np.array([[0, 0, 90.0], [0, 0, 60.0], [0, 0, 30.0], [0, 0, 120.0], [0, 2, 28.0]])
    keep = plausible_chain(orders, pos, [1.0, 0.9, 0.95, 0.5, 0.4])
    assert [orders[i] for i in keep] == [k("T12"), k("L1"), k("L2")]


def test_plausibility_lets_transitional_levels_be_absent():
    def k(n):
        return BY_NAME[n].order
    orders = [k("T11"), k("T12"), k("L1"), k("L2")]  # T13 absent: T12 -> L1 is one step
    pos = np.array([[0, 0, 100.0], [0, 0, 75.0], [0, 0, 45.0], [0, 0, 12.0]])
    assert len(plausible_chain(orders, pos, [1, 1, 1, 1])) == 4


def _toy_volume(n_vert=5, spacing=4.0, seed=0):
    """A toy spine on a 4 mm grid: bright blocks 7 voxels apart, labelled from T10 down."""
    rng = np.random.default_rng(seed)
    a = np.full((8 * n_vert + 6, 24, 24), -1000.0, np.float32)
    a[:, 4:20, 4:20] = 0.0
    centres = {}
    first = BY_NAME["T10"].order
    for i in range(n_vert):
        z = a.shape[0] - 6 - 8 * i  # cranial first (z grows cranially)
        a[z - 2:z + 3, 10:15, 9 + i % 2:14 + i % 2] = 500 + 50 * i
        centres[LEVELS[first + i].label] = (z, 12.0, 11.0 + i % 2)
    a += rng.normal(0, 20, a.shape).astype(np.float32)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((spacing,) * 3)
    mm = {lab: img.TransformContinuousIndexToPhysicalPoint((x, y, z)) for lab, (z, y, x) in centres.items()}
    return img, mm


def test_make_case_maps_centroids_to_grid_indices():
    img, mm = _toy_volume()
    case = make_case("toy", img, mm, 4.0, partial_labels=[BY_NAME["T10"].label])
    k = BY_NAME["T11"].order
    assert np.allclose(case.centers[k], [case.array.shape[0] - 14, 12, 12], atol=1e-6)
    assert case.partial[BY_NAME["T10"].order] and not case.partial[k]
    assert np.isnan(case.centers[0]).all()


@pytest.mark.parametrize("seed", range(4))
def test_augmented_patch_and_target_stay_aligned(seed):
    """Rotation, scaling, flip and translation move image and target heatmap together."""
    a = np.zeros((40, 40, 40), np.float32)
    centre = np.array([18.0, 22.0, 15.0])
    zz, yy, xx = np.mgrid[0:40, 0:40, 0:40]
    a = np.exp(-((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) / (2 * 2.0 ** 2))
    centers = np.full((N_LEVELS, 3), np.nan)
    centers[3] = centre
    case = Case("blob", a.astype(np.float32), centers, np.zeros(N_LEVELS, bool), 0.0, 4.0)
    sampler = PatchSampler([case], (24, 24, 24), 2.0, seed, rotate_deg=20, intensity=0.0, spine_bias=1.0)
    x, y = sampler.sample()
    img_peak = np.unravel_index(int(x[0].argmax()), x.shape[1:])
    tgt_peak = np.unravel_index(int(y[3].argmax()), y.shape[1:])
    assert np.abs(np.array(img_peak) - np.array(tgt_peak)).max() <= 1
    assert float(y[0].abs().max()) == 0.0


class _Echo(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x, 2 * x], dim=1)


def test_overlapping_patches_blend_back_to_the_whole_volume():
    a = np.random.default_rng(1).normal(size=(37, 29, 41)).astype(np.float32)
    h = predict_heatmaps(_Echo(), a, (16, 16, 16), pad_value=0.0, overlap=0.25)
    assert h.shape == (2,) + a.shape
    assert np.allclose(h[0], a, atol=1e-5) and np.allclose(h[1], 2 * a, atol=1e-5)


class _CountingEcho(_Echo):
    """An echo that counts the patches it was given and outputs zeros where the input is zero
    (as the network's heatmaps are near zero where there is no bone)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        return super().forward(x)


def test_patches_without_bone_are_not_run_and_the_others_blend_as_before():
    a = np.zeros((80, 20, 20), np.float32)
    a[4:30] = np.random.default_rng(2).normal(size=(26, 20, 20))     # the skeleton's end of a
    bone = bone_bearing(np.where(a != 0, 400.0, 40.0))              # long series; soft tissue on
    every, skipping = _CountingEcho(), _CountingEcho()
    h_all = predict_heatmaps(every, a, (16, 16, 16), pad_value=0.0, overlap=0.25)
    h_bone = predict_heatmaps(skipping, a, (16, 16, 16), pad_value=0.0, overlap=0.25, bone=bone)
    assert skipping.calls < every.calls / 2
    assert np.allclose(h_bone, h_all, atol=1e-6)
    assert np.allclose(h_bone[0], a, atol=1e-5)
    one = _CountingEcho()
    nothing = predict_heatmaps(one, np.zeros_like(a), (16, 16, 16), 0.0, 0.25,
                               bone=np.zeros(a.shape, bool))
    assert one.calls == 1 and nothing.shape == (2,) + a.shape and not nothing.any()


def test_bone_bearing_starts_above_soft_tissue():
    hu = np.array([-1000.0, 40.0, 70.0, 99.0, 100.0, 250.0, 1200.0])
    assert bone_bearing(hu).tolist() == [False, False, False, False, True, True, True]


def test_decode_reports_lps_millimetres_and_drops_weak_channels():
    img, mm = _toy_volume()
    prep = prepare(img, 4.0)
    centres = np.full((N_LEVELS, 3), np.nan)
    for lab, p in mm.items():
        centres[BY_LABEL[lab].order] = prep.mm_to_index([p])[0]
    h = gaussian_heatmaps(prep.array.shape, centres, 1.5).numpy()
    h[BY_NAME["T11"].order] *= 0.1  # below the presence threshold
    found = decode(h, prep, threshold=0.3)
    names = [v.name for v in found]
    assert names == ["T10", "T12", "T13", "L1"]  # the toy spine has a T13
    for v in found:
        assert np.allclose(v.centroid_mm, mm[v.label], atol=0.05)


def test_loss_is_zero_for_a_perfect_heatmap():
    y = torch.rand(2, 3, 4, 5, 6)
    assert heatmap_loss(y, y).item() == 0.0
    assert heatmap_loss(y + 0.1, y).item() > 0.0


def test_smoke_training_writes_resumable_checkpoints_and_shippable_weights(tmp_path):
    cases = []
    for s in range(2):
        img, mm = _toy_volume(seed=s)
        cases.append(make_case(f"toy{s}", img, mm, 4.0))
    cfg = TrainConfig(out_dir=tmp_path / "run", patch=(16, 16, 16), base=2, batch=1, iterations=3, val_every=3,
                      log_every=1, lr=1e-3)
    best = train(cfg, log=lambda s: None, train_cases=cases)
    assert best.exists() and (tmp_path / "run" / "last.pt").exists()
    model = build_from_checkpoint(torch.load(best, weights_only=True))
    assert model.meta["spacing_mm"] == 4.0 and model.meta["patch"] == [16, 16, 16]
    cfg.iterations, cfg.resume = 5, True
    train(cfg, log=lambda s: None, train_cases=cases)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed from" in log and "it 5/5" in log


def test_validation_groups_count_equally_and_synthesised_validation_needs_its_own_seed(tmp_path):
    from pipeline.localization.train import choose_decoder_groups, synth_validation_cases

    img, mm = _toy_volume()
    case = make_case("toy", img, mm, 4.0)
    right = gaussian_heatmaps(case.array.shape, case.centers, 1.5).numpy()
    empty = np.zeros_like(right)
    one = choose_decoder_groups({"phantom": ([right], [case])})
    assert one["id_rate"] == 1.0 and "groups" not in one
    both = choose_decoder_groups({"phantom": ([right], [case]), "synth": ([empty], [case])})
    # the phantom group is perfect, the other finds nothing: the score is the mean of the two
    assert both["groups"]["phantom"]["id_rate"] == 1.0 and both["groups"]["synth"]["id_rate"] == 0.0
    assert both["id_rate"] == 1.0
    assert both["score"] == pytest.approx(0.5 * (both["groups"]["phantom"]["score"]
                                                 + both["groups"]["synth"]["score"]))
    assert both["groups"]["synth"]["score"] == pytest.approx(20.0)  # every vertebra missed
    with pytest.raises(ValueError, match="training volumes' seed"):
        synth_validation_cases(TrainConfig(out_dir=tmp_path, synth_real_dir=str(tmp_path),
                                           val_synth_cases=2, seed=3, val_synth_seed=3), print)
    with pytest.raises(ValueError, match="synth-from"):
        synth_validation_cases(TrainConfig(out_dir=tmp_path, val_synth_cases=2), print)


def test_localize_runs_end_to_end_with_a_given_model():
    from pipeline.localization.infer import localize

    img, _ = _toy_volume()
    model = MSCN(out_channels=N_LEVELS, base=2)
    model.meta = {"spacing_mm": 4.0, "patch": [16, 16, 16], "threshold": 0.3}
    timings = {}
    found = localize(img, device="cpu", model=model, timings=timings)
    assert isinstance(found, list) and set(timings) == {"load_model", "preprocess", "network", "decode"}


def _gt(names_z, partial=()):
    return [{"label": BY_NAME[n].label, "name": n, "centroid_mm": [0.0, 0.0, z], "partial": n in partial}
            for n, z in names_z]


def test_evaluation_counts_identification_errors_and_false_positives():
    from pipeline.evaluate import REPORT_KEYS, localization_case, localization_report

    gt = _gt([("T11", 90.0), ("T12", 60.0), ("L1", 30.0), ("L2", 0.0)], partial=("L2",))
    pred = [
        {"label": BY_NAME["T11"].label, "name": "T11", "centroid_mm": [0.0, 3.0, 90.0]},   # right, 3 mm
        {"label": BY_NAME["L1"].label, "name": "L1", "centroid_mm": [0.0, 0.0, 60.0]},     # on T12: wrong label
        {"label": BY_NAME["L2"].label, "name": "L2", "centroid_mm": [0.0, 0.0, 1.0]},      # partial: not an FP
        {"label": BY_NAME["L4"].label, "name": "L4", "centroid_mm": [0.0, 0.0, -80.0]},    # nothing there
    ]
    case = localization_case(gt, pred)
    assert case.n_required == 3 and case.identified == 1
    assert case.errors_mm == {"T11": 3.0, "L1": 30.0} and case.missed == ["T12"]
    assert case.false_positives == ["L4"]
    report = localization_report([case])
    assert set(REPORT_KEYS) <= set(report) and report["dice"] is None
    assert report["id_rate"] == pytest.approx(1 / 3)
    assert report["localization_error_mm"] == pytest.approx(16.5)
    assert report["precision"] == pytest.approx(3 / 4)    # T11, L1-on-T12, L2-on-partial matched
    assert report["recall"] == pytest.approx(2 / 3)       # T11 and T12 found as vertebrae, L1 not
    assert report["errors_over_mm"] == {">4": pytest.approx(2 / 3), ">10": pytest.approx(2 / 3),
                                        ">20": pytest.approx(2 / 3)}


def test_seed_ranges_parse_and_evaluation_seeds_are_refused_for_training():
    from pipeline.evaluate import parse_seeds
    from pipeline.localization.dataset import phantom_case

    assert parse_seeds("1-3,7, 9") == [1, 2, 3, 7, 9]
    with pytest.raises(ValueError, match="evaluation seed"):
        phantom_case(9005, 4.0)


def test_joint_decoder_labels_a_contiguous_chain_from_ambiguous_channels():
    """Each vertebra's mass is split between its own and the neighbouring channels (an unsure
    network); the joint labelling still reads T11, T12, L1, L2 (no T13), cranial to caudal."""
    from pipeline.localization.infer import detect

    names = ["T11", "T12", "L1", "L2"]
    zs = [40.0, 31.0, 22.0, 13.0]
    centres = {n: np.array([z, 10.0, 10.0]) for n, z in zip(names, zs)}
    h = np.zeros((N_LEVELS, 50, 20, 20), np.float32)
    for n in names:
        k = BY_NAME[n].order
        one = gaussian_heatmaps((50, 20, 20), np.array([centres[n]]), 1.5).numpy()[0]
        h[k] += 0.45 * one
        h[k + 1] += 0.3 * one   # the caudal neighbour channel (T12 -> T13 for T12)
        h[k - 1] += 0.25 * one
    found = detect(h, threshold=0.5, spacing_mm=4.0, method="joint")
    assert [LEVELS[k].name for k, _, _ in found] == names
    for (_k, pos, _), n in zip(found, names):
        assert np.allclose(pos, centres[n], atol=0.05)


def _blob(shape, z):
    return gaussian_heatmaps(shape, np.array([[z, 10.0, 10.0]]), 1.5).numpy()[0]


def test_relabelling_names_a_vertebra_whose_channel_peaked_on_its_neighbour():
    """L3's channel peaks on L4 (two lumbar channels on one body): the per-channel maxima leave
    the L3 body unlabelled; the joint relabelling along the path names it. Nothing is added
    beyond the found ends (L5's body below L4 has no L5 evidence of its own here)."""
    from pipeline.localization.infer import detect

    zs = {"L1": 46.0, "L2": 37.0, "L3": 28.0, "L4": 19.0, "L5": 10.0}
    shape = (56, 20, 20)
    h = np.zeros((N_LEVELS,) + shape, np.float32)
    for n in ("L1", "L2", "L4"):
        h[BY_NAME[n].order] = _blob(shape, zs[n])
    h[BY_NAME["L3"].order] = 0.9 * _blob(shape, zs["L4"]) + 0.2 * _blob(shape, zs["L3"])
    h[BY_NAME["L4"].order] += 0.3 * _blob(shape, zs["L3"]) + 0.3 * _blob(shape, zs["L5"])
    plain = detect(h, threshold=0.3, spacing_mm=4.0, method="argmax")
    assert [LEVELS[k].name for k, _, _ in plain] == ["L1", "L2", "L4"]
    found = detect(h, threshold=0.3, spacing_mm=4.0, method="argmax", relabel=True)
    assert [LEVELS[k].name for k, _, _ in found] == ["L1", "L2", "L3", "L4"]
    for k, p, _ in found:
        assert np.allclose(p, [zs[LEVELS[k].name], 10.0, 10.0], atol=0.3)


def test_relabelling_undoes_two_labels_shifted_onto_the_next_bodies():
    """Seed 9009's failure: the T9 and T10 channels peak one body caudal (on T10 and T11), the
    true T9 body is left unclaimed, the T11 channel loses to "T10" on the T11 body. Read along
    the spine, T4-T8 and T12 anchor the labels: every body gets its own level."""
    from pipeline.localization.infer import detect

    names = ["T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12"]
    zs = {n: 90.0 - 9.0 * i for i, n in enumerate(names)}
    shape = (100, 20, 20)
    h = np.zeros((N_LEVELS,) + shape, np.float32)
    for n in ("T4", "T5", "T6", "T7", "T8", "T12"):
        h[BY_NAME[n].order] = _blob(shape, zs[n])
    h[BY_NAME["T9"].order] = 0.7 * _blob(shape, zs["T10"]) + 0.3 * _blob(shape, zs["T9"])
    h[BY_NAME["T10"].order] = 0.8 * _blob(shape, zs["T11"]) + 0.35 * _blob(shape, zs["T10"])
    h[BY_NAME["T11"].order] = 0.6 * _blob(shape, zs["T11"])
    plain = detect(h, threshold=0.3, spacing_mm=2.0, method="argmax")  # 18 mm per body
    assert [(LEVELS[k].name, round(float(p[0]))) for k, p, _ in plain][5:] == [("T9", 36), ("T10", 27), ("T12", 18)]
    found = detect(h, threshold=0.3, spacing_mm=2.0, method="argmax", relabel=True)
    assert [LEVELS[k].name for k, _, _ in found] == names
    for k, p, _ in found:
        assert abs(p[0] - zs[LEVELS[k].name]) < 0.3


def test_gap_length_counts_the_levels_it_holds():
    from pipeline.localization.infer import gap_skips

    z = [0.0, -20.0, -40.0, -60.0, -160.0, -180.0, -200.0]   # 20 mm steps, one 100 mm gap
    mm = np.array([[0.0, 0.0, v] for v in z])
    out = gap_skips(mm)
    assert np.isnan(out[[0, 1, 2, 4, 5]]).all()
    assert out[3] == pytest.approx(4.0)              # 100 mm of 20 mm steps: four vertebrae missing
    assert np.isnan(gap_skips(mm[:2])).all() and len(gap_skips(mm[:1])) == 0


def test_relabelling_across_a_gap_names_the_far_side_by_its_distance_and_fills_the_curve():
    """A kyphotic thoracic spine T2-T12, 20 mm per level: the channels peak on T2-T4 and T10-T12
    only; the bodies between (T5-T9) bow 40 mm backwards, off the straight line from T4 to T10,
    and carry level-agnostic evidence only. Named one after the other, T10-T12 would become
    T5-T7; across the gap the labelling counts the levels that its length holds, and the bodies
    of the curve, near enough to the gap's chord, are found and named."""
    from pipeline.localization.infer import detect

    names = [f"T{i}" for i in range(2, 13)]
    z = {n: 230.0 - 20.0 * i for i, n in enumerate(names)}
    bow = {n: 40.0 * np.sin(np.pi * i / (len(names) - 1)) for i, n in enumerate(names)}  # y, mm
    shape = (64, 40, 12)  # 4 mm grid: z, y, x
    h = np.zeros((N_LEVELS,) + shape, np.float32)

    def blob(n):
        return gaussian_heatmaps(shape, np.array([[z[n] / 4.0, 4.0 + bow[n] / 4.0, 6.0]]), 1.0).numpy()[0]

    for n in names:
        if n in ("T2", "T3", "T4", "T10", "T11", "T12"):
            h[BY_NAME[n].order] += blob(n)
        else:   # seen as a vertebra, but the network cannot tell which
            for m in ("T5", "T6", "T7", "T8", "T9"):
                h[BY_NAME[m].order] += 0.12 * blob(n)
    plain = detect(h, threshold=0.3, spacing_mm=4.0, method="argmax")
    assert [LEVELS[k].name for k, _, _ in plain] == ["T2", "T3", "T4", "T10", "T11", "T12"]
    found = detect(h, threshold=0.3, spacing_mm=4.0, method="argmax", relabel=True)
    assert [LEVELS[k].name for k, _, _ in found] == names
    for k, p, _ in found:
        assert abs(p[0] * 4.0 - z[LEVELS[k].name]) < 1.0


def test_two_labels_on_one_body_are_merged_but_a_cut_end_vertebra_is_kept():
    from pipeline.localization.infer import merge_crowded

    def k(n):
        return BY_NAME[n].order
    # 1 mm grid; steps of 20 mm, except C6 -> C7 (8 mm: two channels on the C7 body) and the
    # last step to a cut T4 (9 mm: its centroid is that of its visible part).
    z = {"C4": 100.0, "C5": 80.0, "C6": 60.0, "C7": 52.0, "T1": 32.0, "T2": 12.0, "T3": -8.0, "T4": -17.0}
    found = [(k(n), np.array([zz, 0.0, 0.0]), 0.5 if n == "C6" else 0.8) for n, zz in z.items()]
    kept = merge_crowded(found, 1.0)
    assert [LEVELS[o].name for o, _, _ in kept] == ["C4", "C5", "C7", "T1", "T2", "T3", "T4"]


def test_a_cut_end_vertebra_found_twice_keeps_one_detection():
    """Two detections 15 mm apart at the top edge of the volume, with 33 mm steps below, are one
    cut vertebra: the outer goes. The same short step away from the edge stays (a cut vertebra's
    centroid sits in its visible part, nearer its neighbour), and so does a normal end."""
    from pipeline.localization.infer import drop_doubled_ends

    spacing, nz = 4.0, 60
    zs_mm = [234.0, 219.0, 186.0, 153.0, 120.0, 87.0]          # cranial first; top edge 236 mm
    found = [(k, np.array([z / spacing, 20.0, 20.0]), 1.0) for k, z in enumerate(zs_mm)]
    kept = drop_doubled_ends(found, spacing, nz)
    assert [k for k, _, _ in kept] == [1, 2, 3, 4, 5]
    far = [(k, p - np.array([10.0, 0, 0]), s) for k, p, s in found]  # 40 mm below the edge
    assert len(drop_doubled_ends(far, spacing, nz)) == 6
    normal = [(k, np.array([(236.0 - 33.0 * k) / spacing, 20.0, 20.0]), 1.0) for k in range(6)]
    assert len(drop_doubled_ends(normal, spacing, nz)) == 6
