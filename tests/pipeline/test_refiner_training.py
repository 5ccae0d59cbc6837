"""The refiner's trainer (resumable, cached crops) and the installation of the segmentation
weights in two independent parts (2 mm network, 1 mm refiner)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.registry import load_model, read_manifest
from pipeline.segmentation.caches import refine_cache_path
from pipeline.segmentation.model import UNet3D
from pipeline.segmentation.train import SegTrainConfig, assemble, install
from pipeline.segmentation.train_refiner import RefineTrainConfig, train
from pipeline.training import save_best


def _fake_cache(cache: Path, seeds, n: int = 48) -> None:
    """A bright ball in soft tissue per crop: what :func:`refine_samples` caches, in small."""
    z, y, x = np.mgrid[:n, :n, :n]
    r = np.sqrt((z - n / 2) ** 2 + (y - n / 2) ** 2 + (x - n / 2) ** 2)
    ct = np.where(r < 12, 700, 40).astype(np.int16)[None].repeat(2, 0)
    occ = np.clip(np.round((12.5 - r) * 8), 0, 8).astype(np.uint8)[None].repeat(2, 0)
    for s in seeds:
        np.savez(refine_cache_path(cache, s), ct=ct, occ=occ)


def test_refiner_training_resumes_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_cache(cache, [100, 101, 8001])
    lines: list[str] = []
    cfg = RefineTrainConfig(out_dir=str(tmp_path / "run"), train_seeds=[100, 101], val_seeds=[8001],
                            cache_dir=str(cache), steps=4, batch=1, val_every=2, ckpt_every=2,
                            schedule="cosine")
    best = train(cfg, log=lines.append)
    assert best.exists() and (tmp_path / "run" / "last.ckpt").exists()
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["step"] == 4
    cfg.steps = 6
    train(cfg, log=lines.append)
    assert "resumed at step 4" in lines
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["step"] == 6
    with pytest.raises(ValueError, match="evaluation seed"):
        train(RefineTrainConfig(out_dir=str(tmp_path / "bad"), train_seeds=[9003], val_seeds=[8001],
                                cache_dir=str(cache), steps=1), log=lines.append)


def test_installing_one_part_keeps_the_other(tmp_path):
    torch.manual_seed(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_cache(cache, [100, 8001])
    ref_best = train(RefineTrainConfig(out_dir=str(tmp_path / "ref"), train_seeds=[100], val_seeds=[8001],
                                       cache_dir=str(cache), steps=2, batch=1, val_every=2),
                     log=lambda m: None)
    coarse = UNet3D(base=2, depth=2)
    coarse_best = tmp_path / "seg" / "best.pt"
    coarse_best.parent.mkdir()
    save_best(coarse_best, coarse, 7, {"loss": 0.5}, SegTrainConfig(train_seeds=[100], val_seeds=[8001]))
    wdir = tmp_path / "weights"

    with pytest.raises(ValueError, match="no 2 mm network"):
        install(None, refiner=ref_best, weights_dir=wdir)
    install(coarse_best, weights_dir=wdir)
    assert load_model("segmentation", "cpu", wdir).refiner is None
    install(None, refiner=ref_best, weights_dir=wdir)
    m = load_model("segmentation", "cpu", wdir)
    assert m.refiner is not None and m.meta["step"] == 7 and m.meta["refiner"]["step"] == 2
    refiner_state = {k: v.clone() for k, v in m.refiner.state_dict().items()}
    # a new 2 mm network: the refiner stays
    coarse2 = UNet3D(base=2, depth=2)
    save_best(coarse_best, coarse2, 9, {"loss": 0.4}, SegTrainConfig(train_seeds=[100], val_seeds=[8001]))
    install(coarse_best, weights_dir=wdir)
    m2 = load_model("segmentation", "cpu", wdir)
    assert m2.meta["step"] == 9 and m2.refiner is not None
    assert all(torch.equal(v, m2.refiner.state_dict()[k]) for k, v in refiner_state.items())
    assert all(torch.equal(v, m2.coarse.state_dict()[k]) for k, v in coarse2.state_dict().items())
    assert read_manifest(wdir)["segmentation"]["trained_steps"] == 9
    # what `spine-node evaluate --refiner none` evaluates: the shipped network alone
    alone, meta = assemble(None, drop_refiner=True, weights_dir=wdir)
    assert alone.refiner is None and meta["refiner"] is None and meta["step"] == 9
