"""Training data of the 1 mm boundary refiner (:mod:`pipeline.segmentation.refine` is its
inference): the 1 mm crops cut around each true centroid, simulated coarse priors, and the
patches drawn near the surface or where a coarse network errs. Only trainers import this module.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.segmentation.refine import REFINE_SPACING_MM, ct_channel


def simulated_prior(occ_fine: np.ndarray, rng: np.random.Generator,
                    box: tuple[Sequence[int], Sequence[int]] | None = None, scale: float = 1.0) -> np.ndarray:
    """What the 2 mm network would give, from the 1 mm occupancy (0..1) of the ground truth:
    block-averaged to 2 mm, trilinearly back to 1 mm, shifted by up to one 1 mm voxel and
    thickened or thinned by a random power (the coarse network's bias).

    ``scale``: of ``occ_fine`` to 0..1 (1/8 for the cached eighths).
    ``box = (lo, hi)``: only that part of the result (a training patch) is wanted; it is computed
    from an even-aligned sub-volume 4 voxels larger on each side, which gives the same values as the
    whole crop inside the box (the 2 mm blocks and the interpolation see the same voxels) at a
    fraction of the cost, except where the box touches the crop's border (there the whole crop's
    shift wraps around its other side; the sub-volume's wraps around its own).
    """
    import torch.nn.functional as F

    full = np.array(occ_fine.shape)
    if box is None:
        lo, hi = np.zeros(3, int), full
    else:
        lo = np.maximum((np.asarray(box[0]) - 4) // 2 * 2, 0)
        hi = np.minimum(-((-(np.asarray(box[1]) + 4)) // 2) * 2, full)
    sub = occ_fine[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    t = torch.from_numpy(np.ascontiguousarray(sub[None, None], np.float32) * np.float32(scale))
    coarse = F.avg_pool3d(t, 2, ceil_mode=True)
    up = F.interpolate(coarse, size=sub.shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    shift = rng.integers(-1, 2, 3)
    up = np.roll(up, tuple(int(s) for s in shift), axis=(0, 1, 2))
    gamma = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    out = np.clip(up, 0.0, 1.0) ** gamma
    if box is None:
        return out
    return out[tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(box[0], box[1], lo))]


def fine_occupancy(labels: sitk.Image, label: int, centre_mm: Sequence[float], size: int,
                   spacing_mm: float = REFINE_SPACING_MM) -> np.ndarray:
    """Fraction (0..1, in eighths) of each ``spacing_mm`` voxel inside ``label`` (labels at half spacing)."""
    from pipeline.segmentation.crops import occupancy

    return occupancy(labels, label, centre_mm, size, spacing_mm).astype(np.float32) / 8.0


#: Side of the 1 mm training crop around each centroid, and of the patches drawn from it.
REFINE_CROP = 96
REFINE_PATCH = 40


def refine_samples(ct: sitk.Image, labels: sitk.Image, vertebrae, size: int = REFINE_CROP
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(ct int16 [n, s, s, s], occupancy uint8 eighths [n, s, s, s])`` at 1 mm per vertebra."""
    from pipeline.segmentation.crops import ct_crop, occupancy

    cts, occs = [], []
    for v in vertebrae:
        c = v["centroid_mm"]
        cts.append(np.clip(ct_crop(ct, c, size, REFINE_SPACING_MM), -32768, 32767).astype(np.int16))
        occs.append(occupancy(labels, int(v["label"]), c, size, REFINE_SPACING_MM))
    return np.stack(cts), np.stack(occs)


def _capped_points(masks: Iterable[np.ndarray], cap: int, seed: int) -> list[np.ndarray]:
    """The flat indices of each mask's voxels, at most ``cap`` of them drawn at random."""
    rng = np.random.default_rng(seed)
    out = []
    for mask in masks:
        flat = np.flatnonzero(mask)
        if len(flat) > cap:
            flat = rng.choice(flat, cap, replace=False)
        out.append(flat)
    return out


def surface_points(occs: np.ndarray, cap: int = 4096, seed: int = 0) -> list[np.ndarray]:
    """For each crop of ``occs`` (eighths), the flat indices of up to ``cap`` voxels of its surface
    band (1-7 eighths inside), drawn once: where :func:`refine_batch` centres its patches."""
    return _capped_points(((occ >= 1) & (occ <= 7) for occ in occs), cap, seed)


def error_points(occs: np.ndarray, priors: np.ndarray, cap: int = 4096, seed: int = 0) -> list[np.ndarray]:
    """For each crop, the flat indices of up to ``cap`` voxels where the real coarse prior
    (uint8 in 1/255, :mod:`pipeline.segmentation.coarse_prior`) and the truth disagree at 0.5:
    where a refiner trained on that prior has something to learn."""
    return _capped_points(((prior >= 128) != (occ >= 4) for occ, prior in zip(occs, priors)), cap, seed)


def refine_batch(cts: np.ndarray, occs: np.ndarray, rng: np.random.Generator, batch: int,
                 patch: int = REFINE_PATCH, surfaces: Sequence[np.ndarray] | None = None,
                 priors: np.ndarray | None = None, errors: Sequence[np.ndarray] | None = None,
                 error_share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Patches centred near the vertebra's surface (where refinement matters), with a simulated
    prior (or the real one, ``priors``): ``x [b, 2, p, p, p]``, target ``[b, 1, p, p, p]``
    (occupancy 0..1).

    ``surfaces``: :func:`surface_points` of ``occs``, computed once by a trainer (otherwise each
    drawn crop's surface is found again).
    ``priors`` (uint8 in 1/255, one per crop): the 2 mm network's real prior instead of the
    simulated one (:mod:`pipeline.segmentation.coarse_prior`); then ``error_share`` of the
    patches are centred on its :func:`error_points` ``errors`` (where it is wrong), the others on
    the surface."""
    xs, ts = [], []
    s = cts.shape[1]
    shape = occs.shape[1:]
    for _ in range(batch):
        i = int(rng.integers(len(cts)))
        surf = surfaces[i] if surfaces is not None else surface_points(occs[i:i + 1], cap=1 << 30)[0]
        if priors is not None and errors is not None and len(errors[i]) and rng.random() < error_share:
            surf = errors[i]
        if len(surf) == 0:
            centre = np.array([s // 2] * 3)
        else:
            centre = np.array(np.unravel_index(int(surf[int(rng.integers(len(surf)))]), shape))
        c = centre + rng.integers(-patch // 4, patch // 4 + 1, 3)
        o = np.clip(c - patch // 2, 0, s - patch)
        sl = tuple(slice(int(a), int(a) + patch) for a in o)
        if priors is not None:
            prior = priors[i][sl].astype(np.float32) / 255.0
        else:
            prior = simulated_prior(occs[i], rng, (o, o + patch), scale=1.0 / 8.0)
        hu = cts[i][sl].astype(np.float32) * float(rng.uniform(0.93, 1.07)) + float(rng.uniform(-20, 20))
        x = np.stack([ct_channel(hu), prior])
        t = (occs[i][sl].astype(np.float32) / 8.0)[None]
        if rng.random() < 0.5:
            x, t = x[..., ::-1], t[..., ::-1]
        xs.append(x)
        ts.append(t)
    return np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(ts))
