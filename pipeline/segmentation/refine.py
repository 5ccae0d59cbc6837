"""Boundary refinement at 1 mm of the 2 mm segmentation (why: measured in docs/archive/model-card-history.md).

The 3D U-Net works on 64^3 crops at 2 mm (the paper's 128^3 at 1 mm costs 7.8 s per training
step on the 2-core CPU). Even a perfect 2 mm occupancy map, resampled linearly to the source grid,
reaches only a Dice of about 0.91-0.93 per vertebra on the phantom (measured on seed 8001): the
vertebra's processes are a few voxels thick at 2 mm; a fixed HU threshold in the uncertain band
does no better (the PSF spreads the cortex outward). So a small 1 mm network
(:class:`pipeline.segmentation.model.ShallowRefiner`; 2 input channels: the CT at 1 mm and the
coarse foreground probability upsampled to 1 mm) corrects the coarse map at 1 mm inside the box
where the coarse map is positive or uncertain. (A 3-level U-Net there takes ~8 s per vertebra
on this CPU: too slow for the 60 s budget of a whole study.)

Two ways to train it: on a prior simulated from the ground truth (the 2 mm occupancy upsampled,
shifted by up to a voxel and thickened or thinned; no coarse network needed, so both can train at
the same time), or on the 2 mm network's own output (:mod:`pipeline.segmentation.coarse_prior`,
a cascade: it then learns the network's real misses, whole processes included; how the shipped
refiner was trained, docs/archive/model-card-history.md "Fifth round").
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.segmentation.crops import array_image, reference_grid, resample

#: Grid of the refinement (mm) and the margin around the coarse foreground it covers (mm).
REFINE_SPACING_MM = 1.0
REFINE_MARGIN_MM = 4.0
#: Fixed HU scaling of the refiner's CT channel (patches are too small for a stable z-score).
HU_CENTRE, HU_SCALE = 100.0, 400.0


def ct_channel(hu: np.ndarray) -> np.ndarray:
    return ((np.clip(hu, -1000.0, 2000.0) - HU_CENTRE) / HU_SCALE).astype(np.float32)


def refine_grid(fg: np.ndarray, crop: sitk.Image, threshold: float = 0.02,
                spacing_mm: float = REFINE_SPACING_MM, margin_mm: float = REFINE_MARGIN_MM,
                multiple: int = 4) -> sitk.Image | None:
    """An LPS-aligned 1 mm grid over the coarse foreground (the largest 26-connected part of
    ``fg > threshold``) plus a margin; its size a multiple of ``multiple`` (the refiner's pooling).

    Only the largest part: faint responses elsewhere in the 128 mm crop (a neighbour's process, a
    rib) more than doubled the box (on a 22-vertebra study, 1.08 M voxels per vertebra on average
    against 0.47 M), and the merge keeps only each vertebra's largest component anyway.
    """
    import cc3d

    above = fg > threshold
    if not above.any():
        return None
    cc = cc3d.connected_components(above.astype(np.uint8), connectivity=26)
    sizes = np.bincount(cc.ravel())
    sizes[0] = 0
    idx = np.argwhere(cc == int(sizes.argmax()))
    cs = np.array(crop.GetSpacing())
    lo_mm = np.array(crop.TransformContinuousIndexToPhysicalPoint(idx.min(0)[::-1].astype(float).tolist())) - margin_mm - cs / 2
    hi_mm = np.array(crop.TransformContinuousIndexToPhysicalPoint(idx.max(0)[::-1].astype(float).tolist())) + margin_mm + cs / 2
    size = np.ceil((hi_mm - lo_mm) / spacing_mm).astype(int)
    size = ((size + multiple - 1) // multiple) * multiple
    centre = (lo_mm + hi_mm) / 2.0
    return reference_grid(centre.tolist(), size.tolist(), spacing_mm)


def refine_input(image: sitk.Image, fg: np.ndarray, crop: sitk.Image) -> tuple[np.ndarray, sitk.Image] | None:
    """The refiner's input ``[2, z, y, x]`` (CT channel, coarse prior) on its 1 mm grid, and the grid."""
    grid = refine_grid(fg, crop)
    if grid is None:
        return None
    prior = resample(array_image(fg.astype(np.float32), crop), grid, True, 0.0)
    hu = resample(image, grid, True, -1024.0)
    return np.stack([ct_channel(hu), prior]), grid


@torch.no_grad()
def refine(model: torch.nn.Module, image: sitk.Image, fg: np.ndarray, crop: sitk.Image,
           device: str | torch.device = "cpu") -> tuple[np.ndarray, sitk.Image] | None:
    """The refined foreground probability ``[z, y, x]`` on its 1 mm grid, and the grid."""
    inp = refine_input(image, fg, crop)
    if inp is None:
        return None
    x = torch.from_numpy(inp[0][None]).to(device)
    return torch.sigmoid(model(x)[0, 0].float()).cpu().numpy(), inp[1]


#: Vertebrae per forward pass of the refiner on a GPU, and the multiple their common box is
#: rounded up to (so that studies of similar size share the GPU library's choice of kernels).
GPU_REFINE_BATCH = 8
GPU_REFINE_ROUND = 16
#: Most voxels in one such batch: 8 M voxels x 16 channels x 4 bytes = 0.5 GiB per activation, so
#: that a GPU of a few GiB still holds a batch of wide boxes (then fewer per batch).
GPU_REFINE_VOXELS = 8_000_000


@torch.no_grad()
def refine_many(model: torch.nn.Module, image: sitk.Image, fgs: Sequence[np.ndarray],
                crops: Sequence[sitk.Image], device: str | torch.device = "cpu",
                batch: int | None = None) -> list[tuple[np.ndarray, sitk.Image] | None]:
    """:func:`refine` for every vertebra. On the CPU one at a time; on a GPU ``batch`` at a time
    (default :data:`GPU_REFINE_BATCH`): each box zero-padded to a common shape, with the mask that
    gives it the values it has alone (:meth:`pipeline.segmentation.model.ShallowRefiner.forward`),
    the last batch filled with empty boxes so that every call has the same shape."""
    device = torch.device(device)
    if batch is None:
        batch = GPU_REFINE_BATCH if device.type == "cuda" else 1
    if batch <= 1:
        return [refine(model, image, fg, crop, device) for fg, crop in zip(fgs, crops)]
    from pipeline.host_threads import host_map

    inputs = host_map(lambda fc: refine_input(image, *fc), list(zip(fgs, crops)), device)
    present = [k for k, inp in enumerate(inputs) if inp is not None]
    results: list[tuple[np.ndarray, sitk.Image] | None] = [None] * len(inputs)
    if not present:
        return results
    common = np.max([inputs[k][0].shape[1:] for k in present], axis=0)
    common = -(-common // GPU_REFINE_ROUND) * GPU_REFINE_ROUND
    n_batch = max(1, min(batch, len(present), GPU_REFINE_VOXELS // int(np.prod(common))))
    boxes = {k: tuple(slice(0, n) for n in inputs[k][0].shape[1:]) for k in present}
    for i in range(0, len(present), n_batch):
        group = present[i:i + n_batch]
        x = torch.zeros((n_batch, 2, *common), dtype=torch.float32, device=device)
        mask = torch.zeros((n_batch, 1, *common), dtype=torch.float32, device=device)
        for j, k in enumerate(group):
            x[(j, slice(None)) + boxes[k]] = torch.from_numpy(inputs[k][0]).to(device)
            mask[(j, slice(None)) + boxes[k]] = 1.0
        p = torch.sigmoid(model(x, mask)[:, 0].float())
        for j, k in enumerate(group):
            results[k] = (p[(j,) + boxes[k]].cpu().numpy(), inputs[k][1])
    return results


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
    from pipeline.segmentation.dataset import occupancy

    return occupancy(labels, label, centre_mm, size, spacing_mm).astype(np.float32) / 8.0


# ---- training ----------------------------------------------------------------------------------
#: Side of the 1 mm training crop around each centroid, and of the patches drawn from it.
REFINE_CROP = 96
REFINE_PATCH = 40


def refine_samples(ct: sitk.Image, labels: sitk.Image, vertebrae, size: int = REFINE_CROP
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(ct int16 [n, s, s, s], occupancy uint8 eighths [n, s, s, s])`` at 1 mm per vertebra."""
    from pipeline.segmentation.crops import ct_crop
    from pipeline.segmentation.dataset import occupancy

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
