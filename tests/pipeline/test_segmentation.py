"""Segmentation: crops, soft targets, a smoke training and the merge onto the source grid."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.segmentation.crops import ct_crop, reference_grid
from pipeline.segmentation.dataset import augmented_batch, case_samples
from pipeline.segmentation.infer import segment
from pipeline.segmentation.model import UNet3D
from pipeline.segmentation.train import dice_ce_loss
from tests.pipeline.synthetic import box_spine


def test_crop_is_lps_aligned_and_centred_whatever_the_source_orientation():
    ct, _, gt = box_spine(levels=("L1",))
    c = gt["vertebrae"][0]["centroid_mm"]
    a = ct_crop(ct, c, 16, 2.0)
    flipped = sitk.Flip(ct, [True, False, True])     # same physical image, other index order
    b = ct_crop(flipped, c, 16, 2.0)
    assert a.shape == (16, 16, 16)
    # the same physical content (up to the noise that block averaging groups differently)
    assert np.abs(a - b).mean() < 10.0
    assert a[6:10, 6:10, 6:10].mean() > 150 and b[6:10, 6:10, 6:10].mean() > 150


def test_occupancy_targets_hold_the_vertebra_volume():
    ct, labels, gt = box_spine(levels=("L1", "L2"))
    s = case_samples("box", ct, labels, gt["vertebrae"], size=40, spacing_mm=2.0, margin=2)
    true_mm3 = (sitk.GetArrayFromImage(labels) == 20).sum() * np.prod(ct.GetSpacing())
    assert abs(s[0].occupancy.sum() / 8 * 8.0 - true_mm3) / true_mm3 < 0.03
    x, t = augmented_batch(s, np.random.default_rng(0), size=40)
    assert x.shape == (2, 1, 40, 40, 40) and np.allclose(t.sum(1), 1.0)


def test_smoke_training_lowers_the_loss_and_inference_labels_each_vertebra_once():
    torch.manual_seed(0)
    ct, labels, gt = box_spine(levels=("L1", "L2", "L3"), spacing=(1.5, 1.5, 2.0))
    samples = case_samples("box", ct, labels, gt["vertebrae"], size=24, spacing_mm=4.0, margin=2)
    net = UNet3D(base=4, depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        x, t = augmented_batch(samples, rng, size=24)
        loss = dice_ce_loss(net(torch.from_numpy(x)), torch.from_numpy(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    res = segment(ct, [(v["label"], v["centroid_mm"]) for v in gt["vertebrae"]], net, "cpu", size=24, spacing_mm=4.0)
    out = sitk.GetArrayFromImage(res.label_map)
    truth = sitk.GetArrayFromImage(labels)
    assert res.label_map.GetSize() == ct.GetSize()
    assert set(np.unique(out)) <= {0, 20, 21, 22}
    for v in res.vertebrae:
        assert 0.0 <= v.fracture_score <= 1.0
        # each vertebra, where found, overlaps its own truth more than any neighbour
        if v.voxels:
            hits = np.bincount(truth[out == v.label], minlength=30)
            assert hits.argmax() in (0, v.label)


def test_overlapping_crops_give_each_voxel_to_the_most_confident_one():
    class Centre(torch.nn.Module):
        """A fake network: a ball of foreground at the crop centre."""
        def forward(self, x):
            n = x.shape[-1]
            r = torch.linspace(-1, 1, n)
            d = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
            fg = (1.5 - 2 * d).clamp(0, 1)[None, None].expand(x.shape[0], 1, n, n, n)
            return torch.log(torch.cat([1 - fg + 1e-4, fg + 1e-4, torch.full_like(fg, 1e-4)], 1))
    img = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    res = segment(img, [(20, (19.5, 19.5, 14.0)), (21, (19.5, 19.5, 26.0))], Centre(), size=16, spacing_mm=2.0)
    arr = sitk.GetArrayFromImage(res.label_map)
    assert arr[10, 20, 20] == 20 and arr[29, 20, 20] == 21
    assert arr[19, 20, 20] == 20 and arr[21, 20, 20] == 21   # the boundary falls halfway


def test_a_voxel_both_crops_claim_as_surely_goes_to_the_nearer_centroid():
    """A crop that claims its neighbour's body as surely as its own (real cervical CT): the
    distance weight gives the shared voxels to the nearer centroid; without it the first crop
    keeps all it claimed."""
    class Everything(torch.nn.Module):
        """A fake network: foreground (0.9) over the whole crop."""
        def forward(self, x):
            fg = torch.full_like(x, 0.9)
            return torch.log(torch.cat([1 - fg, fg, torch.full_like(fg, 1e-4)], 1))
    img = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    cents = [(20, (19.5, 19.5, 14.0)), (21, (19.5, 19.5, 26.0))]
    near = sitk.GetArrayFromImage(segment(img, cents, Everything(), size=16, spacing_mm=2.0).label_map)
    assert near[17, 20, 20] == 20 and near[23, 20, 20] == 21 and near[10, 20, 20] == 20
    assert near[19, 20, 20] == 20 and near[21, 20, 20] == 21   # the boundary falls halfway
    first = sitk.GetArrayFromImage(segment(img, cents, Everything(), size=16, spacing_mm=2.0,
                                           contested_sigma_mm=None).label_map)
    assert first[23, 20, 20] == 20 and first[30, 20, 20] == 21


def test_the_distance_weight_is_physical_whatever_the_grid_direction():
    from pipeline.segmentation.infer import distance_weight

    grid = sitk.Image([5, 6, 7], sitk.sitkUInt8)
    grid.SetSpacing((1.0, 2.0, 3.0))
    grid.SetOrigin((10.0, -4.0, 7.0))
    grid.SetDirection((0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0))    # a sagittal series
    c = (12.0, -1.0, 9.5)
    w = distance_weight(grid, c, sigma_mm=10.0)
    for idx in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        d2 = float(np.sum((np.array(grid.TransformIndexToPhysicalPoint(idx)) - c) ** 2))
        assert w[idx[2], idx[1], idx[0]] == pytest.approx(np.exp(-d2 / 200.0), rel=1e-5)


def test_the_refiners_box_covers_the_vertebra_not_a_faint_response_elsewhere_in_the_crop():
    from pipeline.segmentation.refine import refine_grid

    fg = np.zeros((32, 32, 32), np.float32)
    fg[12:20, 13:19, 11:21] = 0.9          # the vertebra (2 mm voxels)
    fg[11, 12:20, 10:22] = 0.04            # its faint rim: part of it
    crop = reference_grid((0.0, 0.0, 0.0), 32, 2.0)
    alone = refine_grid(fg, crop)
    fg[2:4, 28:30, 1:3] = 0.05             # a faint response far away (a neighbour's process)
    with_blob = refine_grid(fg, crop)
    assert with_blob.GetSize() == alone.GetSize() and with_blob.GetOrigin() == alone.GetOrigin()
    # the rim is inside: 11 voxels of 2 mm in x (10..21) + 4 mm margins -> at least 30 mm
    assert alone.GetSize()[0] * alone.GetSpacing()[0] >= 24 * 2.0 / 2 + 8
    assert refine_grid(np.zeros_like(fg), crop) is None


def test_validation_groups_count_equally_and_synthesised_validation_needs_its_own_seed(tmp_path):
    import pytest

    from pipeline.segmentation.train import synth_validation_samples, validate, validate_groups
    from pipeline.segmentation.train_config import SegTrainConfig

    torch.manual_seed(0)
    ct, labels, gt = box_spine(levels=("L1", "L2"), spacing=(1.5, 1.5, 2.0))
    samples = case_samples("box", ct, labels, gt["vertebrae"], size=16, spacing_mm=4.0, margin=2)
    net = UNet3D(base=2, depth=2)
    a, b = validate(net, samples[:1], size=16), validate(net, samples[1:], size=16)
    one = validate_groups(net, {"phantom": samples[:1]}, size=16)
    assert one == a and "groups" not in one
    both = validate_groups(net, {"phantom": samples[:1], "synth": samples[1:]}, size=16)
    assert both["loss"] == pytest.approx(0.5 * (a["loss"] + b["loss"]))
    assert both["dice"] == pytest.approx(0.5 * (a["dice"] + b["dice"]))
    assert both["groups"] == {"phantom": a, "synth": b}
    with pytest.raises(ValueError, match="training crops' seed"):
        synth_validation_samples(SegTrainConfig(synth_real_dir=str(tmp_path), val_synth_cases=2, seed=4,
                                                val_synth_seed=4), tmp_path, print)
    with pytest.raises(ValueError, match="synth-from"):
        synth_validation_samples(SegTrainConfig(val_synth_cases=2), tmp_path, print)
