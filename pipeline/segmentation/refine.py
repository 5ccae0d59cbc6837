"""Boundary refinement at 1 mm of the 2 mm segmentation (why: measured in docs/archive/model-card-history.md).

The 3D U-Net works on 64^3 crops at 2 mm (the paper's 128^3 at 1 mm has eight times the voxels,
more than CPU training affords). Even a perfect 2 mm occupancy map, resampled linearly to the source grid,
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

from collections.abc import Sequence

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

    def physical(index: np.ndarray) -> np.ndarray:
        return np.array(crop.TransformContinuousIndexToPhysicalPoint(index[::-1].astype(float).tolist()))

    lo_mm = physical(idx.min(0)) - margin_mm - cs / 2
    hi_mm = physical(idx.max(0)) + margin_mm + cs / 2
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
        if device.type == "cpu":
            # oneDNN runs the refiner's 3D convolutions about a third faster on channels-last
            # weights (bench/process.py: the segmentation stage); the same values to float32
            # rounding. In place, once: the cached model keeps it.
            model = model.to(memory_format=torch.channels_last_3d)
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
