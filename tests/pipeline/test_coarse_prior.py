"""The refiner trained on the 2 mm network's own output (a cascade): the caches it reads are
matched crop for crop, the prior lands where the network saw the vertebra whatever the shift,
the wider refiner starts as the one it grows from, and the trainer runs on such priors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.segmentation.caches import refine_cache_path, seg_cache_path
from pipeline.segmentation.coarse_prior import coarse_priors, match_whole, network_tag
from pipeline.segmentation.dataset import MARGIN, Sample, save_samples
from pipeline.segmentation.infer import CROP_SIZE
from pipeline.segmentation.model import NORMAL, ShallowRefiner, UNet3D
from pipeline.segmentation.train_refiner import RefineTrainConfig, train
from pipeline.training import save_best


def _ball(n: int, spacing: float, centre_mm=(0.0, 0.0, 0.0), radius_mm: float = 12.0) -> np.ndarray:
    """Signed distance (mm) to a ball's surface on an ``n^3`` grid of ``spacing`` centred on 0,
    array order ``[z, y, x]``; ``centre_mm`` in (x, y, z)."""
    c = (np.arange(n) - (n - 1) / 2.0) * spacing
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.sqrt((x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2) - radius_mm


class _Threshold(nn.Module):
    """A stand-in 2 mm network that calls bone (normalised CT > 0) a normal vertebra."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], 3) + x.shape[2:], -20.0)
        logits[:, 0] = 0.0
        logits[:, NORMAL] = 20.0 * x[:, 0]
        return logits


def test_match_whole_finds_the_whole_vertebrae_among_every_crop():
    n2 = CROP_SIZE + 2 * MARGIN
    occ2 = [np.clip(np.round(-_ball(n2, 2.0, (0, 0, dz), 10.0 + k) * 4 + 4), 0, 8).astype(np.uint8)
            for k, dz in enumerate((-30.0, 0.0, 3.0, 6.0, 30.0))]
    occ1 = [np.clip(np.round(-_ball(96, 1.0, (0, 0, dz), 10.0 + k) * 8 + 4), 0, 8).astype(np.uint8)
            for k, dz in enumerate((-30.0, 0.0, 3.0, 6.0, 30.0))]
    # every crop: 5 vertebrae, partial ones first and last; whole ones: the middle three
    assert match_whole(np.stack(occ2), np.stack(occ1[1:4])) == 1
    assert match_whole(np.stack(occ2), np.stack(occ1[2:5])) == 2
    with pytest.raises(ValueError, match="no offset"):
        match_whole(np.zeros_like(np.stack(occ2)), np.full_like(np.stack(occ1[1:4]), 8))


@pytest.mark.parametrize("shift_seed", [0, 1, 2])
def test_the_prior_lands_on_the_vertebra_whatever_the_crops_shift(shift_seed):
    """The 2 mm crop is cut at a random shift from the cached margin; its output must be put back
    where it was cut, or the refiner learns from a prior beside the vertebra."""
    n2 = CROP_SIZE + 2 * MARGIN
    centre = (5.0, -3.0, 7.0)  # off the crop's centre on purpose (x, y, z)
    ct = np.where(_ball(n2, 2.0, centre) < 0, 800.0, 0.0).astype(np.float32)[None]
    prior, shift = coarse_priors(_Threshold(), ct, 96, np.random.default_rng(shift_seed))
    truth = _ball(96, 1.0, centre) < 0
    p = prior[0] >= 128
    dice = 2 * (p & truth).sum() / (p.sum() + truth.sum())
    assert dice > 0.9, (dice, shift)
    zz, yy, xx = np.nonzero(p)
    got = np.array([xx.mean(), yy.mean(), zz.mean()]) - 47.5
    assert np.allclose(got, centre, atol=1.0), (got, shift)


def test_extra_layers_start_at_zero_and_respect_the_batch_mask():
    torch.manual_seed(0)
    base = ShallowRefiner(width=6)
    nn.init.normal_(base.out.weight, std=0.5)
    wide = ShallowRefiner(width=6, extra_dilations=(2, 4))
    wide.load_base(base.state_dict(), base.config)
    x = torch.randn(1, 2, 20, 20, 20)
    x[:, 1] = torch.rand(1, 20, 20, 20)
    assert torch.equal(base(x), wide(x))
    with pytest.raises(ValueError, match="not the base"):
        ShallowRefiner(width=8, extra_dilations=(2,)).load_base(base.state_dict(), base.config)
    # trained extra layers: a box padded into a bigger batch still gets its own values
    for conv in wide.extra:
        nn.init.normal_(conv.weight, std=0.1)
    big = torch.zeros(1, 2, 32, 32, 32)
    big[:, :, :20, :20, :20] = x
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[:, :, :20, :20, :20] = 1
    with torch.no_grad():
        own = wide(x)[0, 0]
        masked = wide(big, mask)[0, 0, :20, :20, :20]
        leaked = wide(big)[0, 0, :20, :20, :20]
    assert torch.allclose(own, masked, atol=1e-5)
    assert not torch.allclose(own, leaked, atol=1e-3)


def test_refiner_trains_on_a_networks_own_priors(tmp_path):
    torch.manual_seed(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    n2, n1 = CROP_SIZE + 2 * MARGIN, 48
    for seed in (100, 8001):
        d2, d1 = _ball(n2, 2.0), _ball(n1, 1.0)
        ct2 = np.where(d2 < 0, 700.0, 40.0).astype(np.float16)
        occ2 = np.clip(np.round(-d2 * 4 + 4), 0, 8).astype(np.uint8)
        # a partial vertebra first (all air): the whole one is the second crop
        save_samples([Sample(np.full_like(ct2, -1000), np.zeros_like(occ2), False, 1, "p"),
                      Sample(ct2, occ2, False, 2, "w")], seg_cache_path(cache, seed))
        ct1 = np.where(d1 < 0, 700, 40).astype(np.int16)[None]
        occ1 = np.clip(np.round(-d1 * 8 + 4), 0, 8).astype(np.uint8)[None]
        np.savez(refine_cache_path(cache, seed), ct=ct1, occ=occ1)
    coarse = UNet3D(base=2, depth=2)
    coarse_best = tmp_path / "coarse" / "best.pt"
    coarse_best.parent.mkdir()
    save_best(coarse_best, coarse, 3, {"loss": 1.0}, RefineTrainConfig())
    base = train(RefineTrainConfig(out_dir=str(tmp_path / "base"), train_seeds=[100], val_seeds=[8001],
                                   cache_dir=str(cache), steps=1, batch=1, patch=24, val_every=1),
                 log=lambda m: None)
    lines: list[str] = []
    best = train(RefineTrainConfig(out_dir=str(tmp_path / "casc"), train_seeds=[100], val_seeds=[8001],
                                   cache_dir=str(cache), steps=2, batch=1, patch=24, val_every=2,
                                   prior="coarse", coarse_from=str(coarse_best), extra_dilations="2,4",
                                   init_from=str(base)),
                 log=lines.append)
    tag = network_tag(coarse)
    assert (cache / f"cas-phantom-100-{tag}.npz").exists()
    assert any("extra layers (2, 4) at zero" in m for m in lines)
    ck = torch.load(best, weights_only=False)
    assert ck["config"]["extra_dilations"] == [2, 4]
    assert ck["train"]["prior"] == "coarse" and ck["val"]["coarse_network"] == tag
    # installed beside its own network: quiet; beside another one: told to train it again
    import warnings

    from pipeline.segmentation.train import install

    wdir = tmp_path / "weights"
    install(coarse_best, weights_dir=wdir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        install(None, refiner=best, weights_dir=wdir)
    save_best(coarse_best, UNet3D(base=2, depth=2), 4, {"loss": 0.9}, RefineTrainConfig())
    with pytest.warns(UserWarning, match="train it again"):
        install(coarse_best, weights_dir=wdir)
    with pytest.raises(ValueError, match="simulated or coarse"):
        train(RefineTrainConfig(out_dir=str(tmp_path / "bad"), train_seeds=[100], val_seeds=[8001],
                                cache_dir=str(cache), steps=1, prior="truth"), log=lambda m: None)


def test_a_coarse_network_of_another_crop_geometry_is_refused(tmp_path):
    from pipeline.segmentation.train import SegTrainConfig
    from pipeline.segmentation.train_refiner import load_coarse

    best = tmp_path / "best.pt"
    save_best(best, UNet3D(base=2, depth=2), 1, {"loss": 1.0},
              SegTrainConfig(train_seeds=[100], val_seeds=[8001], crop_size=96, crop_spacing_mm=1.333))
    with pytest.raises(ValueError, match="96 at 1.333 mm"):
        load_coarse(best)
    save_best(best, UNet3D(base=2, depth=2), 1, {"loss": 1.0}, SegTrainConfig(train_seeds=[100], val_seeds=[8001]))
    assert isinstance(load_coarse(best), UNet3D)



def test_priors_cut_from_a_ct_land_on_its_vertebra():
    """Real and synthesised scans have no segmentation cache: the 2 mm crops are cut from the
    CT itself, and the prior must still lie on the 1 mm crop where the vertebra is."""
    import SimpleITK as sitk

    from pipeline.segmentation.coarse_prior import priors_on_ct

    n = 160
    centre = np.array([6.0, -4.0, 9.0])                     # the ball, off the crop centre (x, y, z)
    ct = np.where(_ball(n, 1.0, centre) < 0, 800.0, -20.0).astype(np.float32)
    image = sitk.GetImageFromArray(ct)
    origin = -(n - 1) / 2.0
    image.SetOrigin((origin, origin, origin))
    crop_centre = (2.0, 1.0, 3.0)
    prior = priors_on_ct(_Threshold(), image, [crop_centre], 96, np.random.default_rng(0))
    assert prior.shape == (1, 96, 96, 96) and prior.dtype == np.uint8
    truth = _ball(96, 1.0, centre - np.array(crop_centre)) < 0
    p = prior[0] >= 128
    assert 2 * (p & truth).sum() / (p.sum() + truth.sum()) > 0.85   # a 2 mm outline, 1 mm thicker
    zz, yy, xx = np.nonzero(p)
    got = np.array([xx.mean(), yy.mean(), zz.mean()]) - 47.5
    assert np.allclose(got, centre - np.array(crop_centre), atol=1.0), got


def test_refiner_learns_from_real_and_synthesised_crops_with_the_networks_priors(tmp_path):
    """--real-data and --synth-from with --prior coarse: every crop carries the 2 mm network's
    own prior, cached per network."""
    import SimpleITK as sitk

    from tests.pipeline.synthetic import box_spine

    torch.manual_seed(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    n2, n1 = CROP_SIZE + 2 * MARGIN, 96                       # real crops are 96^3 at 1 mm
    for seed in (100, 8001):
        d2, d1 = _ball(n2, 2.0), _ball(n1, 1.0)
        ct2 = np.where(d2 < 0, 700.0, 40.0).astype(np.float16)
        occ2 = np.clip(np.round(-d2 * 4 + 4), 0, 8).astype(np.uint8)
        save_samples([Sample(ct2, occ2, False, 2, "w")], seg_cache_path(cache, seed))
        np.savez(refine_cache_path(cache, seed), ct=np.where(d1 < 0, 700, 40).astype(np.int16)[None],
                 occ=np.clip(np.round(-d1 * 8 + 4), 0, 8).astype(np.uint8)[None])
    ct, labels, _gt = box_spine(levels=("T12", "L1", "L2", "L3"))
    real = tmp_path / "real"
    (real / "rawdata" / "sub-box").mkdir(parents=True)
    (real / "derivatives" / "sub-box").mkdir(parents=True)
    sitk.WriteImage(ct, str(real / "rawdata" / "sub-box" / "sub-box_ct.nii.gz"))
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8),
                    str(real / "derivatives" / "sub-box" / "sub-box_seg-vert_msk.nii.gz"))
    coarse = UNet3D(base=2, depth=2)
    coarse_best = tmp_path / "coarse" / "best.pt"
    coarse_best.parent.mkdir()
    save_best(coarse_best, coarse, 3, {"loss": 1.0}, RefineTrainConfig())
    lines: list[str] = []
    best = train(RefineTrainConfig(out_dir=str(tmp_path / "run"), train_seeds=[100], val_seeds=[8001],
                                   cache_dir=str(cache), steps=2, batch=1, patch=24, val_every=2,
                                   prior="coarse", coarse_from=str(coarse_best), real_data=str(real),
                                   real_repeat=2, synth_from=str(real), synth_cases=2),
                 log=lines.append)
    tag = network_tag(coarse)
    assert list(cache.glob(f"cas-real-*-{tag}.npz"))
    synth = list(cache.glob(f"ref-synth*-n2-s0-{tag}.npz"))
    assert synth
    with np.load(synth[0]) as z:
        assert z["ct"].shape[1:] == (96, 96, 96) and z["prior"].shape == z["occ"].shape
        n_synth = len(z["ct"])
    assert n_synth >= 1
    assert any("real training crops" in m and "each x2" in m for m in lines)
    assert any(f"{n_synth} crops of CT synthesised" in m for m in lines)
    assert torch.load(best, weights_only=False)["val"]["coarse_network"] == tag


def test_subjects_held_out_of_the_synthesis_are_left_out_and_named_in_the_cache(tmp_path):
    import SimpleITK as sitk

    from pipeline.segmentation.refine_synth import cached_synth_refine_samples
    from tests.pipeline.synthetic import box_spine

    _ct, labels, _gt = box_spine(levels=("L1", "L2", "L3"))
    for subject in ("sub-a", "sub-b"):
        (tmp_path / "masks" / subject).mkdir(parents=True)
        sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8),
                        str(tmp_path / "masks" / subject / f"{subject}_seg-vert_msk.nii.gz"))
    with pytest.raises(ValueError, match="subjects excluded: sub-a, sub-b"):
        cached_synth_refine_samples(tmp_path / "masks", tmp_path / "cache", 1, 3,
                                    exclude=["sub-a", "sub-b"])
    ct, occ, prior = cached_synth_refine_samples(tmp_path / "masks", tmp_path / "cache", 1, 3,
                                                 exclude=["sub-a"])
    assert prior is None and len(ct) == len(occ)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == \
        ["ref-synth1-folder-masks-without-sub-a-n1-s3-sim.npz"]
