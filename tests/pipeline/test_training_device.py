"""Training on a GPU when one is lent, and the parts that make it worth it: batches prepared in
a background thread, phantom caches written by a process pool, fine-tuning from a run's weights,
checkpoints that load on a machine without a GPU (bench/gpu_round.sh uses all of them)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.registry import ModelWeightsError
from pipeline.segmentation.caches import seg_cache_path
from pipeline.segmentation.dataset import Sample, save_samples
from pipeline.segmentation.infer import CROP_SIZE
from pipeline.segmentation.refine_training import simulated_prior
from pipeline.segmentation.train import SegTrainConfig, train
from pipeline.training import Prefetch, autocast, batches, generate_parallel, train_device


@pytest.mark.slow
def test_generate_parallel_runs_each_seed_once_in_order_on_a_pool_of_processes():
    said: list[str] = []
    assert generate_parallel([3, 5, 4], math.factorial, 2, said.append) == [6, 120, 24]
    assert said[-1].startswith("generated 3/3 phantoms") and said[-1].endswith(", 2 processes)")
    # in the pool: other processes than this one
    pids = generate_parallel([0, 0], _pid_plus, 2, said.append)
    assert os.getpid() not in pids
    assert generate_parallel([1, 2], math.factorial, 1, said.append) == [1, 2]
    assert said[-2:] == ["cached phantom 1", "cached phantom 2"]
    assert generate_parallel([], math.factorial, 4, said.append) == []


def _pid_plus(seed: int) -> int:
    return os.getpid() + seed


def _dies_in_a_worker(seed: int) -> int:
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        os._exit(1)          # what a worker that cannot start looks like to the pool
    return seed * 10


def test_a_broken_pool_falls_back_to_generating_in_this_process():
    said: list[str] = []
    assert generate_parallel([1, 2, 3], _dies_in_a_worker, 2, said.append) == [10, 20, 30]
    assert any("process pool broke" in m for m in said)
    assert said[-3:] == ["cached phantom 1", "cached phantom 2", "cached phantom 3"]


def test_prefetch_keeps_the_order_of_the_batches_and_hands_over_an_error():
    counter = iter(range(100))
    pf = Prefetch(lambda: next(counter), depth=3)
    assert [next(pf) for _ in range(5)] == [0, 1, 2, 3, 4]
    pf.close()

    state = {"n": 0}

    def failing():
        state["n"] += 1
        if state["n"] > 2:
            raise RuntimeError("crop failed")
        return state["n"]

    pf = Prefetch(failing)
    assert next(pf) == 1 and next(pf) == 2
    with pytest.raises(RuntimeError, match="crop failed"):
        next(pf)
    pf.close()


def test_batches_on_the_cpu_are_made_in_the_loop_itself():
    calls = iter(range(10))
    feed = batches(lambda: next(calls), torch.device("cpu"))
    assert [next(feed) for _ in range(3)] == [0, 1, 2]
    assert next(calls) == 3      # nothing was made ahead: a resumed run draws the same batches
    feed.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_is_refused_without_a_gpu_and_the_cpu_trains_in_float32():
    with pytest.raises(ModelWeightsError, match="no CUDA GPU"):
        train_device("cuda")
    assert train_device("auto").type == "cpu"
    with autocast(train_device("cpu")):
        y = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert y.dtype == torch.float32


def test_the_prior_of_a_patch_is_the_prior_of_the_whole_crop_cut_to_the_patch():
    n = 48
    z, y, x = np.mgrid[:n, :n, :n]
    occ = np.clip((14 - np.sqrt((z - 24) ** 2 + (y - 22) ** 2 + (x - 25) ** 2)) / 2, 0, 1).astype(np.float32)
    for k in range(12):
        o = np.random.default_rng(k).integers(1, n - 21, 3)        # inside, off the crop's border
        whole = simulated_prior(occ, np.random.default_rng(k))[tuple(slice(int(a), int(a) + 20) for a in o)]
        part = simulated_prior(occ, np.random.default_rng(k), (o, o + 20))
        assert part.shape == (20, 20, 20)
        np.testing.assert_allclose(part, whole, atol=1e-6)


def _fake_seg_cache(cache: Path, seeds) -> None:
    n = CROP_SIZE + 8
    z, y, x = np.mgrid[:n, :n, :n]
    r = np.sqrt((z - n / 2) ** 2 + (y - n / 2) ** 2 + (x - n / 2) ** 2)
    ct = np.where(r < 10, 700, 40).astype(np.float16)
    occ = np.clip(np.round((10.5 - r) * 8), 0, 8).astype(np.uint8)
    for s in seeds:
        save_samples([Sample(ct, occ, False, 20, f"ball-{s}"), Sample(ct, occ, True, 21, f"ball-{s}b")],
                     seg_cache_path(cache, s))


@pytest.mark.slow
def test_a_segmentation_run_starts_from_another_runs_weights_and_refuses_another_network(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_seg_cache(cache, [100, 8001])
    said: list[str] = []
    common = dict(train_seeds=[100], val_seeds=[8001], cache_dir=str(cache), steps=2, batch=1, base=2, depth=2,
                  val_every=2, ckpt_every=2)
    first = train(SegTrainConfig(out_dir=str(tmp_path / "a"), **common), log=said.append)
    start = torch.load(first, map_location="cpu", weights_only=False)["state_dict"]

    said.clear()
    second = SegTrainConfig(out_dir=str(tmp_path / "b"), init_from=str(first), lr=0.0, **common)
    train(second, log=said.append)
    assert any(m.startswith(f"initialised from {first}") for m in said)
    state = torch.load(tmp_path / "b" / "last.ckpt", map_location="cpu", weights_only=False)["model"]
    for k, v in start.items():      # lr 0 (and weight decay through the lr): nothing moved
        assert torch.equal(state[k], v), k

    with pytest.raises(ValueError, match="is not"):
        train(SegTrainConfig(out_dir=str(tmp_path / "c"), init_from=str(first),
                             **{**common, "base": 4}), log=said.append)


def test_refiner_patches_are_centred_on_the_surface_band_drawn_once():
    from pipeline.segmentation.refine_training import refine_batch, surface_points

    n = 48
    z, y, x = np.mgrid[:n, :n, :n]
    r = np.sqrt((z - 24) ** 2 + (y - 24) ** 2 + (x - 24) ** 2)
    occ = np.clip(np.round((12.5 - r) * 8), 0, 8).astype(np.uint8)[None].repeat(2, 0)
    ct = np.where(r < 12, 700, 40).astype(np.int16)[None].repeat(2, 0)
    surf = surface_points(occ, cap=50)
    assert [len(s) for s in surf] == [50, 50]
    band = occ[0].ravel()[surf[0]]
    assert band.min() >= 1 and band.max() <= 7
    x, t = refine_batch(ct, occ, np.random.default_rng(0), 6, patch=16, surfaces=surf)
    assert x.shape == (6, 2, 16, 16, 16) and t.shape == (6, 1, 16, 16, 16)
    for k in range(6):   # every patch holds some of the surface: inside and outside
        assert 0.0 < t[k].mean() < 1.0
        assert abs(float(x[k, 1].mean()) - float(t[k].mean())) < 0.3   # the prior is near the truth


def test_localization_caches_made_by_a_pool_equal_the_ones_made_here(tmp_path):
    """``train localization --workers N``: the missing phantom caches come from a process pool
    and hold exactly what generating them in this process gives."""
    from pipeline.localization.dataset import cached_phantom_cases, phantom_cache_path

    seeds = [8001, 8002]
    pooled = cached_phantom_cases(seeds, 4.0, tmp_path / "pool", log=lambda _m: None, workers=2)
    here = cached_phantom_cases(seeds, 4.0, tmp_path / "here", log=lambda _m: None, workers=1)
    assert all(phantom_cache_path(tmp_path / "pool", s, 4.0).exists() for s in seeds)
    assert not list((tmp_path / "pool").glob("*.tmp.npz"))
    for a, b in zip(pooled, here):
        assert a.name == b.name and np.array_equal(a.array, b.array)
        assert np.array_equal(a.centers, b.centers, equal_nan=True)
        assert np.array_equal(a.partial, b.partial)


def test_another_crop_geometry_is_cached_apart_trained_and_carried_into_the_weights(tmp_path):
    """`train segmentation --crop-size 24 --crop-spacing-mm 3`: crops of that geometry (with the
    margin in mm of the shipped one), cached under their own names; the geometry goes with the
    checkpoint into the assembled model's meta, which inference crops by."""
    from pipeline.phantom_caches import phantom_samples
    from pipeline.segmentation.caches import geometry_tag
    from pipeline.segmentation.dataset import margin_for
    from pipeline.segmentation.train import assemble

    assert geometry_tag() == "" and geometry_tag(24, 3.0) == "-c24x3mm"
    assert margin_for(2.0) == 4 and margin_for(1.0) == 8 and margin_for(3.0) == 3
    assert seg_cache_path(tmp_path, 5) != seg_cache_path(tmp_path, 5, crop_size=24, crop_spacing_mm=3.0)
    samples = phantom_samples(100, spacing_mm=3.0, crop_size=24, crop_spacing_mm=3.0)
    assert samples and samples[0].ct_hu.shape == (30, 30, 30) and samples[0].occupancy.max() == 8
    cache = tmp_path / "cache"
    cache.mkdir()
    for s in (100, 8001):
        save_samples(samples, seg_cache_path(cache, s, crop_size=24, crop_spacing_mm=3.0))
    best = train(SegTrainConfig(out_dir=str(tmp_path / "g"), train_seeds=[100], val_seeds=[8001],
                                cache_dir=str(cache), steps=2, batch=1, base=2, depth=2, val_every=2,
                                ckpt_every=2, crop_size=24, crop_spacing_mm=3.0), log=lambda s: None)
    model, meta = assemble(best, drop_refiner=True)
    assert meta["crop_size"] == 24 and meta["crop_spacing_mm"] == 3.0 and model.refiner is None
    assert not list(cache.glob("seg-phantom-*-acq.npz"))        # nothing cached under the shipped name
