"""The 2 mm network's own foreground as the refiner's training prior (a cascade).

The refiner (:mod:`pipeline.segmentation.refine`) was first trained on a prior *simulated* from
the ground truth (the 2 mm occupancy, shifted and thickened or thinned). That prior is a blurred
truth: it never lacks a whole transverse or spinous process, which is where the shipped 2 mm
network loses most of its Dice (docs/archive/model-card-history.md). Here the prior is what the 2 mm network really
gives on each training vertebra, so that the refiner learns to correct the network's own misses.

For each phantom the two existing caches are used, no phantom is generated again:
``seg-phantom-<seed>-acq.npz`` (every vertebra's 2 mm crop, 4 voxels of margin, centred on the
true centroid) and ``ref-phantom-<seed>-acq.npz`` (the whole vertebrae's 1 mm crops and
occupancy, centred on the same centroids). Each 2 mm crop is cut from the margin at a random
shift of up to one voxel (2 mm, about the localization error), run through the network, and its
foreground resampled linearly onto the 1 mm crop, as :func:`pipeline.segmentation.refine.
refine_input` does at inference. The result is cached as ``cas-phantom-<seed>-<tag>.npz``
(``prior`` uint8 in 1/255, aligned with the ``ref`` crops), ``tag`` naming the network.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from pipeline.segmentation.crops import array_image, normalise, reference_grid, resample
from pipeline.segmentation.dataset import MARGIN
from pipeline.segmentation.infer import CROP_SIZE, CROP_SPACING_MM, predict_crops
from pipeline.segmentation.model import FRACTURED, NORMAL
from pipeline.segmentation.refine import REFINE_SPACING_MM


def network_tag(coarse: torch.nn.Module) -> str:
    """Eight hex digits that name the 2 mm network's weights (the cache is only valid for them)."""
    h = hashlib.sha256()
    for k, v in sorted(coarse.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def cascade_cache_path(cache_dir: Path, seed: int, tag: str) -> Path:
    return Path(cache_dir) / f"cas-phantom-{seed}-{tag}.npz"


def match_whole(seg_occ: np.ndarray, ref_occ: np.ndarray) -> int:
    """Index of the first of the ``ref`` crops (the whole vertebrae, in the ground truth's order)
    among the ``seg`` crops (every vertebra, partial ones included, same order): the offset whose
    occupancies agree best (the 1 mm occupancy summed to 2 mm against the 2 mm one)."""
    n_seg, n_ref = len(seg_occ), len(ref_occ)
    if n_ref > n_seg:
        raise ValueError(f"{n_ref} whole vertebrae but {n_seg} crops")
    s1 = ref_occ.shape[1] // 2                         # the 1 mm crop's side at 2 mm
    lo = (seg_occ.shape[1] - s1) // 2
    down = ref_occ.astype(np.float32).reshape(n_ref, s1, 2, s1, 2, s1, 2).sum(axis=(2, 4, 6)) / 8.0
    centre = seg_occ[:, lo:lo + s1, lo:lo + s1, lo:lo + s1].astype(np.float32)
    errs = [float(np.abs(centre[k:k + n_ref] - down).mean()) for k in range(n_seg - n_ref + 1)]
    k = int(np.argmin(errs))
    if errs[k] > 0.5:  # eighths per voxel: the same anatomy agrees to a few hundredths
        raise ValueError(f"no offset matches the two caches (best mean difference {errs[k]:.2f} eighths)")
    return k


def coarse_priors(coarse: torch.nn.Module, seg_ct: np.ndarray, fine_size: int,
                  rng: np.random.Generator, max_shift: int = 1, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The network's foreground on the 1 mm crops: ``(prior uint8 [n, s, s, s] in 1/255,
    shift int8 [n, 3] in 2 mm voxels, array order)`` for 2 mm crops ``seg_ct`` (HU, with
    :data:`~pipeline.segmentation.dataset.MARGIN` voxels of margin)."""
    n = len(seg_ct)
    shifts = rng.integers(-max_shift, max_shift + 1, (n, 3))
    m = MARGIN
    crops = np.stack([normalise(seg_ct[i][m + dz:m + dz + CROP_SIZE, m + dy:m + dy + CROP_SIZE,
                                          m + dx:m + dx + CROP_SIZE])
                      for i, (dz, dy, dx) in enumerate(shifts)]) if n else np.zeros((0,) + (CROP_SIZE,) * 3, np.float32)
    probs = predict_crops(coarse, crops, device)
    fine = reference_grid((0.0, 0.0, 0.0), fine_size, REFINE_SPACING_MM)
    out = np.zeros((n, fine_size, fine_size, fine_size), np.uint8)
    for i, (dz, dy, dx) in enumerate(shifts):
        fg = (probs[i, NORMAL] + probs[i, FRACTURED]).astype(np.float32)
        grid = reference_grid((dx * CROP_SPACING_MM, dy * CROP_SPACING_MM, dz * CROP_SPACING_MM),
                              CROP_SIZE, CROP_SPACING_MM)
        p = resample(array_image(fg, grid), fine, True, 0.0)
        out[i] = np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)
    return out, shifts.astype(np.int8)


def priors_on_ct(coarse: torch.nn.Module, image, centroids_mm, fine_size: int,
                 rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """:func:`coarse_priors` of the 1 mm crops of ``fine_size`` around ``centroids_mm`` (LPS) of
    a CT (``image``, HU): the 2 mm crops with their margin are cut from the CT itself (real or
    synthesised scans, which have no segmentation cache)."""
    from pipeline.segmentation.crops import ct_crop

    side = CROP_SIZE + 2 * MARGIN
    seg_ct = np.stack([ct_crop(image, c, side, CROP_SPACING_MM) for c in centroids_mm]) \
        if len(centroids_mm) else np.zeros((0, side, side, side), np.float32)
    return coarse_priors(coarse, seg_ct.astype(np.float32), fine_size, rng, max_shift)[0]


def write_cascade_cache(seed: int, cache_dir: Path, coarse: torch.nn.Module, tag: str) -> Path:
    """The network's priors for phantom ``seed``'s ``ref`` crops (both caches must exist)."""
    from pipeline.segmentation.caches import refine_cache_path, seg_cache_path

    cache_dir = Path(cache_dir)
    with np.load(seg_cache_path(cache_dir, seed)) as z:
        seg_ct, seg_occ = z["ct"], z["occ"]
    with np.load(refine_cache_path(cache_dir, seed)) as z:
        ref_occ = z["occ"]
    k = match_whole(seg_occ, ref_occ)
    rng = np.random.default_rng(seed)
    prior, shift = coarse_priors(coarse, seg_ct[k:k + len(ref_occ)].astype(np.float32), ref_occ.shape[1], rng)
    path = cascade_cache_path(cache_dir, seed, tag)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, prior=prior, shift=shift, first=np.int64(k))
    tmp.replace(path)
    return path


def load_cascade(cache_dir: Path, seeds, coarse: torch.nn.Module, log=print) -> np.ndarray:
    """``prior`` uint8 of every ``ref`` crop of ``seeds`` (concatenated in the order of
    :func:`pipeline.segmentation.train_refiner.load_refine`), computing the missing ones."""
    tag = network_tag(coarse)
    out = []
    seeds = list(seeds)
    for j, seed in enumerate(seeds):
        path = cascade_cache_path(cache_dir, seed, tag)
        if not path.exists():
            write_cascade_cache(seed, cache_dir, coarse, tag)
            if (j + 1) % 10 == 0 or j + 1 == len(seeds):
                log(f"coarse priors: {j + 1}/{len(seeds)} phantoms (network {tag})")
        with np.load(path) as z:
            out.append(z["prior"])
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 1), np.uint8)
