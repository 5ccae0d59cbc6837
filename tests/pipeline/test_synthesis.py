"""Generative domain randomisation from label maps (pipeline/synthesis).

A small box-like spine made here (L1-L3: body, pedicles, lamina, spinous and transverse
processes, in a PIR grid of anisotropic spacing, as real masks come) and, where the shared real
data is present, one real expert mask (sub-verse010, L1-L5): the pose keeps the labels, a seed
reproduces a volume exactly, the fracture takes the requested share of the height, the rendering
makes bone brighter than disc and soft tissue, on the grid of the labels, and the segmentation
crops have the trainer's format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.synthesis import SynthOptions, synthesize
from pipeline.synthesis.fracture import (
    DRAW_LOSS,
    FractureSpec,
    draw_fracture,
    genant_grade,
    simulate_fracture,
)
from pipeline.synthesis.geometry import BODY_SUBREGIONS, pseudo_subregions, voxel_points
from pipeline.synthesis.pose import PoseOptions, random_pose, to_lps_grid
from pipeline.synthesis.raster import Grid
from pipeline.synthesis.render import RenderOptions, disc_masks, render_ct

torch.set_num_threads(1)

REAL = Path(__file__).resolve().parents[2].parent / "shared/data/real-spine"
REAL_MASK = REAL / "sub-verse010/sub-verse010_seg-vert_msk.nii.gz"
needs_real = pytest.mark.skipif(not REAL_MASK.exists(), reason="shared real-spine data absent")

#: Small grids keep the tests fast: little background, no cut, no added level.
SMALL_POSE = PoseOptions(margin_mm=(15.0, 15.0, 8.0), fov_probability=0.0)
SMALL = SynthOptions(pose=SMALL_POSE, extend_probability=0.0, z_room_mm=20.0)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
def toy_spine(spacing=(0.8, 1.0, 1.5)) -> tuple[sitk.Image, sitk.Image]:
    """L1-L3 made of boxes (LPS mm: anterior = -y), as VerSe labels and subregions, on a grid of
    ``spacing`` reoriented to PIR (a VerSe orientation)."""
    lo, hi = np.array([-45.0, -60.0, -95.0]), np.array([45.0, 35.0, 27.0])
    sp = np.asarray(spacing, float)
    n = np.floor((hi - lo) / sp).astype(int) + 1
    x = lo[0] + sp[0] * np.arange(n[0])
    y = lo[1] + sp[1] * np.arange(n[1])
    z = lo[2] + sp[2] * np.arange(n[2])
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    lab = np.zeros(zz.shape, np.uint8)
    sub = np.zeros(zz.shape, np.uint8)

    def box(x0, x1, y0, y1, z0, z1):
        return (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1) & (zz >= z0) & (zz <= z1)

    for label, zc in ((20, 0.0), (21, -34.0), (22, -68.0)):
        parts = [
            (box(-20, 20, -50, -18, zc - 12, zc + 12), 50),                       # body
            (box(-15, -9, -18, -4, zc - 8, zc + 8) | box(9, 15, -18, -4, zc - 8, zc + 8), 41),
            (box(-15, 15, -4, 2, zc - 8, zc + 8), 41),                            # lamina
            (box(-3, 3, 2, 25, zc - 6, zc + 6), 42),                              # spinous
            (box(15, 35, -12, -6, zc - 5, zc + 5), 43),                           # transverse
            (box(-35, -15, -12, -6, zc - 5, zc + 5), 44),
        ]
        for mask, code in parts:
            lab[mask] = label
            sub[mask] = code
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing([float(v) for v in sp])
    img.SetOrigin([float(v) for v in lo])
    simg = sitk.GetImageFromArray(sub)
    simg.CopyInformation(img)
    return sitk.DICOMOrient(img, "PIR"), sitk.DICOMOrient(simg, "PIR")


@pytest.fixture(scope="module")
def toy():
    return toy_spine()


@pytest.fixture(scope="module")
def real_labels():
    if not REAL_MASK.exists():
        pytest.skip("shared real-spine data absent")
    return sitk.ReadImage(str(REAL_MASK))


def volumes_mm3(img: sitk.Image) -> dict[int, float]:
    arr = sitk.GetArrayFromImage(img)
    vals, counts = np.unique(arr[arr > 0], return_counts=True)
    return {int(v): float(c) * float(np.prod(img.GetSpacing())) for v, c in zip(vals, counts)}


def column_heights(labels: sitk.Image, sub: sitk.Image, label: int, frame, bin_mm: float = 2.0
                   ) -> dict[tuple[int, int], tuple[float, float, float]]:
    """Height (mm, along the frame's up axis) of the body of ``label`` in every 2 mm column of
    the frame's (anterior, left) plane: ``{column: (height, a, w)}``."""
    arr = sitk.GetArrayFromImage(labels)
    s = sitk.GetArrayFromImage(sub)
    zyx = np.nonzero((arr == label) & np.isin(s, BODY_SUBREGIONS))
    t, a, w = frame.local(voxel_points(labels, zyx))
    ka, kw = np.round(a / bin_mm).astype(int), np.round(w / bin_mm).astype(int)
    out = {}
    for key in set(zip(ka.tolist(), kw.tolist())):
        m = (ka == key[0]) & (kw == key[1])
        out[key] = (float(t[m].max() - t[m].min() + 1.0), float(a[m].mean()), float(w[m].mean()))
    return out


def height_ratios(before: sitk.Image, before_sub: sitk.Image, result) -> dict[str, float]:
    """Median new/old body height in the anterior, posterior and central columns."""
    h0 = column_heights(before, before_sub, result.label, result.frame)
    h1 = column_heights(result.labels, result.subregions, result.label, result.frame)
    keys = [k for k in h0 if k in h1 and h0[k][0] >= 5.0]
    a = np.array([h0[k][1] for k in keys])
    w = np.array([h0[k][2] for k in keys])
    r = np.array([h1[k][0] / h0[k][0] for k in keys])
    a_post, a_ant = np.percentile(a, (5, 95))
    mid = (np.abs(a - 0.5 * (a_post + a_ant)) < 4.0) & (np.abs(w - np.median(w)) < 4.0)
    return {"anterior": float(np.median(r[a >= a_ant])),
            "posterior": float(np.median(r[a <= a_post])),
            "middle": float(np.median(r[mid]))}


# --------------------------------------------------------------------------------------------
# pose
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pose_keeps_labels_on_a_1mm_lps_grid(toy, seed):
    labels, sub = toy
    posed = random_pose(labels, np.random.default_rng(seed), sub, SMALL_POSE)
    assert posed.labels.GetSpacing() == (1.0, 1.0, 1.0)
    assert np.allclose(posed.labels.GetDirection(), np.eye(3).ravel())
    assert posed.subregions.GetSize() == posed.labels.GetSize()
    v0, v1 = volumes_mm3(labels), volumes_mm3(posed.labels)
    assert set(v1) == set(v0)
    expected = float(np.prod(posed.scale))
    for lab in v0:
        assert 0.6 <= v1[lab] / v0[lab] <= 1.4
        assert v1[lab] / v0[lab] == pytest.approx(expected, rel=0.12)
    # the subregions moved with the labels: the bodies are still inside their vertebrae
    lab_arr = sitk.GetArrayFromImage(posed.labels)
    sub_arr = sitk.GetArrayFromImage(posed.subregions)
    assert np.all((sub_arr > 0) == (lab_arr > 0))


def test_pose_cuts_the_field_of_view(toy):
    labels, sub = toy
    opts = PoseOptions(margin_mm=(15.0, 15.0, 0.0), fov_probability=1.0, min_fov_mm=40.0)
    posed = random_pose(labels, np.random.default_rng(3), None, opts)
    assert posed.z_range_mm is not None and posed.subregions is None
    full = random_pose(labels, np.random.default_rng(3), None,
                       PoseOptions(margin_mm=(15.0, 15.0, 0.0), fov_probability=0.0))
    assert posed.labels.GetSize()[2] < full.labels.GetSize()[2]
    assert set(volumes_mm3(posed.labels)) <= set(volumes_mm3(labels))


@needs_real
def test_pose_keeps_real_labels(real_labels):
    posed = random_pose(real_labels, np.random.default_rng(5), None, SMALL_POSE)
    v0, v1 = volumes_mm3(real_labels), volumes_mm3(posed.labels)
    assert set(v1) == set(v0) == {20, 21, 22, 23, 24}
    for lab in v0:
        assert 0.6 <= v1[lab] / v0[lab] <= 1.4


# --------------------------------------------------------------------------------------------
# fracture
# --------------------------------------------------------------------------------------------
def test_fracture_spec_grades():
    rng = np.random.default_rng(0)
    for _ in range(30):
        spec = draw_fracture(rng)
        assert genant_grade(spec.height_loss) == spec.grade
        assert DRAW_LOSS[spec.grade][0] <= spec.height_loss <= DRAW_LOSS[spec.grade][1]
    with pytest.raises(ValueError):
        FractureSpec(2, "burst", 0.3)


def check_fracture(labels: sitk.Image, sub: sitk.Image, label: int, tol: float) -> None:
    loss = 0.35
    for morphology in ("wedge", "biconcave", "crush"):
        res = simulate_fracture(labels, label, FractureSpec(2, morphology, loss, 1.0), sub)
        r = height_ratios(labels, sub, res)
        if morphology == "wedge":
            assert r["anterior"] == pytest.approx(1 - loss, abs=tol)
            assert r["posterior"] == pytest.approx(1.0, abs=tol)
        elif morphology == "biconcave":
            assert r["middle"] == pytest.approx(1 - loss, abs=tol + 0.03)
            assert r["anterior"] == pytest.approx(1.0, abs=tol)
            assert r["posterior"] == pytest.approx(1.0, abs=tol)
        else:
            for where in ("anterior", "middle", "posterior"):
                assert r[where] == pytest.approx(1 - loss, abs=tol)
        # the posterior elements do not collapse; other levels keep their labels
        assert set(volumes_mm3(res.labels)) == set(volumes_mm3(labels))


def test_fracture_compresses_the_toy_body(toy):
    lps = to_lps_grid(toy[0], toy[1], 1.0, (10.0, 10.0, 30.0))
    check_fracture(lps.labels, lps.subregions, 21, tol=0.05)


def test_fracture_without_subregions_approximates_the_body(toy):
    lps = to_lps_grid(toy[0], None, 1.0, (10.0, 10.0, 30.0))
    approx = sitk.GetArrayFromImage(pseudo_subregions(lps.labels))
    real = sitk.GetArrayFromImage(to_lps_grid(toy[0], toy[1], 1.0, (10.0, 10.0, 30.0)).subregions)
    bone = real > 0
    assert np.mean((approx[bone] == 50) == (real[bone] == 50)) > 0.97
    res = simulate_fracture(lps.labels, 21, FractureSpec(3, "crush", 0.45, 1.0))
    assert res.subregions is None
    r = height_ratios(lps.labels, pseudo_subregions(lps.labels), _with_sub(res))
    assert r["middle"] == pytest.approx(0.55, abs=0.05)


def _with_sub(res):
    res.subregions = pseudo_subregions(res.labels)
    return res


@needs_real
def test_fracture_compresses_a_real_body(real_labels):
    lps = to_lps_grid(real_labels, None, 1.0, (10.0, 10.0, 30.0))
    check_fracture(lps.labels, pseudo_subregions(lps.labels), 22, tol=0.06)


# --------------------------------------------------------------------------------------------
# rendering and the whole synthesis
# --------------------------------------------------------------------------------------------
def check_case(case, source_labels: set[int]) -> None:
    ct, labels = case.ct, case.labels
    assert ct.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
    assert ct.GetSize() == labels.GetSize()
    assert np.allclose(ct.GetOrigin(), labels.GetOrigin())
    assert np.allclose(ct.GetSpacing(), labels.GetSpacing())
    assert np.allclose(ct.GetDirection(), labels.GetDirection())
    assert set(case.centroids_mm) == source_labels
    for lab, (grade, morph) in case.fractures.items():
        assert lab in source_labels and grade in (1, 2, 3)
        assert morph in ("wedge", "biconcave", "crush", "unknown")


def check_bone_brighter(labels: sitk.Image, rng: np.random.Generator) -> None:
    """Rendered with little noise: bone above disc, disc and bone above the soft tissue near
    the spine, on average."""
    opts = RenderOptions(noise_hu=(5.0, 10.0))
    ct = sitk.GetArrayFromImage(render_ct(labels, rng, None, opts))
    lab = sitk.GetArrayFromImage(labels)
    sub = sitk.GetArrayFromImage(pseudo_subregions(labels))
    bodies = (lab > 0) & np.isin(sub, BODY_SUBREGIONS)
    discs = np.zeros(lab.shape, bool)
    for box, d in disc_masks(lab, bodies, Grid.of(labels), 30.0):
        discs[box] |= d
    assert discs.sum() > 500
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(lab > 0, iterations=12) & ~ndi.binary_dilation(lab > 0,
                                                                              iterations=4)
    near &= ~ndi.binary_dilation(discs, iterations=3)
    bone, disc, soft = ct[lab > 0].mean(), ct[discs].mean(), ct[near].mean()
    assert bone > disc + 50
    assert bone > soft + 100


@pytest.mark.slow
def test_same_seed_same_volume_other_seed_other_volume(toy):
    a = synthesize(toy[0], np.random.default_rng(7), toy[1], SMALL)
    b = synthesize(toy[0], np.random.default_rng(7), toy[1], SMALL)
    c = synthesize(toy[0], np.random.default_rng(8), toy[1], SMALL)
    check_case(a, {20, 21, 22})
    check_case(c, {20, 21, 22})
    ca, cb = sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(b.ct)
    assert np.array_equal(ca, cb)
    assert np.array_equal(sitk.GetArrayFromImage(a.labels), sitk.GetArrayFromImage(b.labels))
    assert a.fractures == b.fractures and a.centroids_mm == b.centroids_mm
    la, lc = sitk.GetArrayFromImage(a.labels), sitk.GetArrayFromImage(c.labels)
    cc = sitk.GetArrayFromImage(c.ct)
    bone_a, bone_c = ca[la > 0].mean(), cc[lc > 0].mean()
    assert abs(bone_a - bone_c) > 5.0 or abs(ca[la == 0].mean() - cc[lc == 0].mean()) > 5.0


def test_bone_brighter_than_disc_and_soft_tissue(toy):
    posed = random_pose(toy[0], np.random.default_rng(4), None, SMALL_POSE)
    for seed in (0, 1):
        check_bone_brighter(posed.labels, np.random.default_rng(seed))


def test_myelography_fills_the_spinal_canal_with_contrast(toy):
    """CT myelography: the canal between the toy's bodies (posterior wall y = -18 mm) and
    laminae (y = -4 mm) is as bright as bone with the option, soft tissue without it."""
    from pipeline.synthesis.scene import SceneOptions

    lab, sub = (sitk.DICOMOrient(im, "LPS") for im in toy)

    def canal_hu(myelography: float, seed: int) -> list[float]:
        opts = RenderOptions(scene=SceneOptions(myelography=myelography))
        ct = render_ct(lab, np.random.default_rng(seed), sub, opts)
        arr = sitk.GetArrayFromImage(ct)
        out = []
        for z in (0.0, -17.0, -34.0, -68.0):
            i, j, k = ct.TransformPhysicalPointToIndex((0.0, -11.0, z))
            out.append(float(arr[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2].mean()))
        return out

    for seed in (0, 1, 2):
        assert min(canal_hu(1.0, seed)) > 150.0
        assert max(canal_hu(0.0, seed)) < 150.0


def test_fractures_are_reported(toy):
    opts = SynthOptions(pose=SMALL_POSE, extend_probability=0.0, z_room_mm=20.0,
                        fracture_probability=1.0, max_fractures=1, grades=(3,),
                        morphologies=("crush",))
    case = synthesize(toy[0], np.random.default_rng(11), toy[1], opts)
    assert len(case.fractures) == 1
    (lab, (grade, morph)), = case.fractures.items()
    assert grade == 3 and morph == "crush"
    v = volumes_mm3(case.labels)
    others = [v[k] for k in v if k != lab]
    assert v[lab] < 0.9 * np.mean(others)      # a grade 3 crush loses > 40 % of the body


@needs_real
@pytest.mark.slow
def test_real_mask_synthesis(real_labels):
    a = synthesize(real_labels, np.random.default_rng(0), None, SMALL)
    b = synthesize(real_labels, np.random.default_rng(0), None, SMALL)
    c = synthesize(real_labels, np.random.default_rng(1), None, SMALL)
    src = {20, 21, 22, 23, 24}
    check_case(a, src)
    check_case(c, src)
    assert np.array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(b.ct))
    assert not np.array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(c.ct))
    v0, v1 = volumes_mm3(real_labels), volumes_mm3(a.labels)
    for lab in src - set(a.fractures):
        assert 0.6 <= v1[lab] / v0[lab] <= 1.4
    check_bone_brighter(a.labels, np.random.default_rng(2))


# --------------------------------------------------------------------------------------------
# segmentation crops
# --------------------------------------------------------------------------------------------
def test_segmentation_crops_have_the_trainer_format(toy, tmp_path):
    from pipeline.segmentation.dataset import augmented_batch, margin_for
    from pipeline.segmentation.infer import CROP_SIZE, CROP_SPACING_MM
    from pipeline.synthesis.seg_source import (
        MixedPools,
        RealMask,
        cached_synth_samples,
        case_crops,
    )

    sitk.WriteImage(toy[0], str(tmp_path / "sub-toy_seg-vert_msk.nii.gz"))
    sitk.WriteImage(toy[1], str(tmp_path / "sub-toy_seg-subreg_msk.nii.gz"))
    mask = RealMask(tmp_path / "sub-toy_seg-vert_msk.nii.gz",
                    tmp_path / "sub-toy_seg-subreg_msk.nii.gz", "sub-toy", {20: 0, 21: 0, 22: 0})
    opts = SynthOptions(pose=PoseOptions(fov_probability=0.0), extend_probability=0.0)
    samples = case_crops(mask, np.random.default_rng(3), opts, crops=1, fractured_share=1.0)
    assert len(samples) == 1
    s = samples[0]
    n = CROP_SIZE + 2 * margin_for(CROP_SPACING_MM)
    assert s.ct_hu.shape == (n, n, n) and s.ct_hu.dtype == np.float16
    assert s.occupancy.shape == (n, n, n) and s.occupancy.dtype == np.uint8
    assert s.occupancy.max() == 8 and s.fractured and s.label in (20, 21, 22)
    c = n // 2
    assert s.occupancy[c - 2:c + 3, c - 2:c + 3].mean() > 0          # the centre vertebra
    x, t = augmented_batch([s, s], np.random.default_rng(0))
    assert x.shape == (2, 1, CROP_SIZE, CROP_SIZE, CROP_SIZE)
    assert np.allclose(t.sum(axis=1), 1.0) and t[:, 2].sum() > 0 and t[:, 1].sum() == 0

    cached = cached_synth_samples([mask], 1, tmp_path / "cache", seed=5, options=opts, crops=1,
                                  fractured_share=0.0, log=lambda m: None)
    again = cached_synth_samples([mask], 1, tmp_path / "cache", seed=5, options=opts, crops=1,
                                 fractured_share=0.0, log=lambda m: None)
    assert len(cached) == len(again) == 1
    assert np.array_equal(cached[0].ct_hu, again[0].ct_hu)
    assert len(list((tmp_path / "cache").glob("seg-synth-*.npz"))) == 1

    normal = type(s)(s.ct_hu, s.occupancy, False, s.label, "phantom")
    pools = MixedPools([normal], [s], synth_fraction=0.5)
    picks = [pools.pick(np.random.default_rng(k)).fractured for k in range(40)]
    assert 5 < sum(picks) < 35


@needs_real
def test_real_masks_of_the_training_split_with_their_grades():
    from pipeline.synthesis.seg_source import find_masks, training_subjects

    train = training_subjects()
    assert "sub-ctfu00003" in train and "sub-verse008" not in train   # a validation subject
    masks = find_masks(REAL, ["sub-ctfu00003", "sub-verse004"])
    assert {m.subject for m in masks} == {"sub-ctfu00003", "sub-verse004"}
    ctfu = [m for m in masks if m.subject == "sub-ctfu00003"]
    assert len(ctfu) == 2 and all(m.subregions is not None for m in ctfu)
    assert all(m.grades[20] == 1 and m.grades[21] == 0 for m in ctfu)     # L1 grade 1
    verse = [m for m in masks if m.subject == "sub-verse004"][0]
    assert verse.subregions is None and verse.grades[20] == 3 and verse.grades[16] == 2


def test_held_out_volumes_refuse_the_training_seed_and_validation_subjects():
    """The benches that choose settings without the validation subjects cannot be pointed at
    them, nor at the training caches' seed; both refused before anything is synthesised."""
    from pipeline.realdata.split import load_split
    from pipeline.synthesis.held_out import held_out_volumes, train_side

    validation = sorted(load_split().side("validation"))
    with pytest.raises(ValueError, match="train side"):
        held_out_volumes(Path("/nonexistent"), validation[:1], seed=2000)
    with pytest.raises(ValueError, match="seed 0"):
        held_out_volumes(Path("/nonexistent"), None, seed=0)
    assert set(train_side()).isdisjoint(validation)


def test_bench_volume_options_draw_myelography_only_where_asked():
    """``--myelography`` sets the share of held-out volumes with contrast in the canal; without
    it the benches synthesise with the defaults, which draw none."""
    import argparse

    from pipeline.synthesis.held_out import add_volume_options, options_of

    ap = argparse.ArgumentParser()
    add_volume_options(ap, Path("/nonexistent"))
    assert options_of(ap.parse_args([])) == SynthOptions()
    assert SynthOptions().render.scene.myelography == 0.0
    asked = options_of(ap.parse_args(["--myelography", "0.5"]))
    assert asked.render.scene.myelography == 0.5
    assert asked.pose == SynthOptions().pose
