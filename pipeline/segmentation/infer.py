"""Per-vertebra segmentation and its merge onto the source grid (paper section 2.3.1, eq. 10-11).

For each centroid a crop of ``size^3`` voxels of ``spacing_mm`` (LPS-aligned) goes through the 3D
U-Net; its foreground probability (normal + fractured), refined at 1 mm where the model carries
a refiner (:mod:`pipeline.segmentation.refine`), is resampled linearly back onto the source grid,
where every voxel goes to the vertebra whose crop gives it the highest probability, if that
is above 0.5 ("overlaps between neighbouring crops": each crop only ever labels the vertebra in
its centre, so the neighbour's crop is the one that claims a neighbour's voxel). Where two crops
both claim a voxel, each probability is weighed by the voxel's distance from that crop's centroid
(:data:`CONTESTED_SIGMA_MM`): on real cervical CT a crop often claims the body below its own as
well, with as high a probability. Each vertebra then keeps its largest 6-connected component.
The fractured flag of a vertebra is the share of its foreground probability that the network
gives to the fractured class.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.segmentation.crops import (
    CROP_SIZE,
    CROP_SPACING_MM,
    array_image,
    ct_crop,
    normalise,
    reference_grid,
    source_box,
)
from pipeline.segmentation.model import FRACTURED, NORMAL


def crop_geometry(record: dict | None) -> tuple[int, float]:
    """``(crop_size, crop_spacing_mm)`` that a weights ``meta`` or a training config records; the
    shipped geometry where it records none (files from before the geometry was recorded)."""
    record = record or {}
    return int(record.get("crop_size", CROP_SIZE)), float(record.get("crop_spacing_mm", CROP_SPACING_MM))


@dataclass
class SegmentedVertebra:
    """One vertebra's segmentation.

    Attributes:
        label: VerSe label.
        centroid_mm: the centroid the crop was centred on (LPS mm).
        fracture_score: share of the foreground probability given to the fractured class (0..1).
        voxels: voxels of the vertebra in the merged label map.
        foreground: foreground probability on the crop grid ``[z, y, x]`` (float32).
        crop: the crop grid (an empty image with the geometry).
        fine: the foreground probability the label map was made from (the 1 mm refinement
            where the model has a refiner, else the crop's), as an image with its geometry.
    """

    label: int
    centroid_mm: tuple[float, float, float]
    fracture_score: float
    voxels: int
    foreground: np.ndarray
    crop: sitk.Image
    fine: sitk.Image | None = None


@dataclass
class SegmentationResult:
    label_map: sitk.Image           # uint8 VerSe labels on the source grid
    vertebrae: list[SegmentedVertebra]


#: Crops per forward pass: 2 on the CPU (measured: larger batches gain nothing there and cost
#: memory), 8 on a GPU, where each call has a fixed cost.
CPU_CROP_BATCH, GPU_CROP_BATCH = 2, 8


def predict_crops(model: torch.nn.Module, crops: np.ndarray, device: str | torch.device = "cpu",
                  batch: int | None = None) -> np.ndarray:
    """Softmax probabilities ``[n, 3, z, y, x]`` of normalised crops ``[n, z, y, x]``."""
    from pipeline.nets.batched import forward_batched

    on_gpu = torch.device(device).type == "cuda"
    if batch is None:
        batch = GPU_CROP_BATCH if on_gpu else CPU_CROP_BATCH
    return forward_batched(model, np.asarray(crops)[:, None], device, batch,
                           post=lambda y: torch.softmax(y, dim=1), empty_shape=(0, 3) + crops.shape[1:],
                           fixed_shape=on_gpu)


#: Width (mm) of the Gaussian distance weight that decides a voxel two crops claim (> 0.5 each):
#: ``p * exp(-d^2 / (2 sigma^2))``, ``d`` the voxel's distance from the crop's centroid. A voxel
#: only one crop claims keeps it whatever the weight. Chosen on CT synthesised from the train
#: side's masks (bench/segmentation_synth.py) and checked on phantom validation seeds (MODEL_CARD).
CONTESTED_SIGMA_MM = 25.0


def distance_weight(grid: sitk.Image, centroid_mm: Sequence[float],
                    sigma_mm: float = CONTESTED_SIGMA_MM) -> np.ndarray:
    """``exp(-d^2 / (2 sigma^2))`` on ``grid`` (``[z, y, x]``, float32), ``d`` the distance (mm)
    of each voxel centre from ``centroid_mm`` (LPS), for any direction of the grid."""
    size = grid.GetSize()
    d = np.array(grid.GetDirection(), dtype=float).reshape(3, 3) * np.array(grid.GetSpacing())
    off = np.array(grid.GetOrigin(), dtype=float) - np.asarray(centroid_mm, dtype=float)
    axes = [np.arange(n, dtype=np.float32) for n in size]                 # x, y, z indices
    d2 = np.zeros(size[::-1], np.float32)
    for j in range(3):                                                   # physical axis j
        comp = (np.float32(off[j]) + np.float32(d[j, 0]) * axes[0][None, None, :]
                + np.float32(d[j, 1]) * axes[1][None, :, None]
                + np.float32(d[j, 2]) * axes[2][:, None, None])
        d2 += comp * comp
    return np.exp(d2 * np.float32(-0.5 / sigma_mm ** 2))


def _sub_grid(image: sitk.Image, lo: np.ndarray, hi: np.ndarray) -> sitk.Image:
    ref = sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8)
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    return ref


def segment(image: sitk.Image, centroids: Sequence[tuple[int, Sequence[float]]],
            model: torch.nn.Module, device: str | torch.device = "cpu",
            size: int = CROP_SIZE, spacing_mm: float = CROP_SPACING_MM,
            contested_sigma_mm: float | None = CONTESTED_SIGMA_MM) -> SegmentationResult:
    """Segment every vertebra of ``centroids`` (``(label, centroid_mm)``) in ``image`` (HU).

    ``contested_sigma_mm``: the distance weight of a voxel two crops claim
    (:data:`CONTESTED_SIGMA_MM`); ``None`` lets the higher probability alone decide."""
    refs = [reference_grid(c, size, spacing_mm) for _, c in centroids]
    # (not on host threads: each crop's RegionOfInterest sets the shared CT's requested region;
    # see pipeline.host_threads)
    crops = np.stack([normalise(ct_crop(image, c, size, spacing_mm)) for _, c in centroids]) \
        if centroids else np.zeros((0, size, size, size), np.float32)
    probs = predict_crops(model, crops, device)

    refiner = getattr(model, "refiner", None)
    fgs = [(probs[k, NORMAL] + probs[k, FRACTURED]).astype(np.float32) for k in range(len(refs))]
    fines: list[sitk.Image] = [array_image(fg, ref) for fg, ref in zip(fgs, refs)]
    if refiner is not None:
        from pipeline.segmentation.refine import refine_many

        for k, r in enumerate(refine_many(refiner, image, fgs, refs, device)):
            if r is not None:
                fines[k] = array_image(r[0].astype(np.float32), r[1])

    full = np.array(image.GetSize())
    boxes = [source_box(image, f, margin=0) for f in fines]
    present = [b for b in boxes if b is not None]
    label_arr = np.zeros(full[::-1], np.uint8)
    vertebrae: list[SegmentedVertebra] = []
    if present:
        # Work inside the bounding box of all crops only: the spine is a small part of the scan.
        roi_lo = np.min([b[0] for b in present], axis=0)
        roi_hi = np.max([b[1] for b in present], axis=0)
        shape = tuple((roi_hi - roi_lo)[::-1])
        # float32: numpy converts float32 -> float16 at ~60 ns a voxel (1.3 s a study on this CPU)
        best = np.zeros(shape, np.float32)
        owner = np.zeros(shape, np.uint8)

        def on_source(k: int) -> tuple[np.ndarray, sitk.Image] | None:
            if boxes[k] is None:
                return None
            sub = _sub_grid(image, *boxes[k])
            return sitk.GetArrayFromImage(sitk.Resample(fines[k], sub, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                        sitk.sitkFloat32)), sub

        # Next to a GPU all resampled at once on the host threads (every vertebra's map on its
        # source box held together); on the CPU one at a time.
        from pipeline.host_threads import host_iter

        for k, ps in enumerate(host_iter(on_source, range(len(fines)), device)):
            if ps is None:
                continue
            p, sub = ps
            # (weighed here, one map at a time, also where the maps were resampled all at once)
            weighed = p if contested_sigma_mm is None else \
                p * distance_weight(sub, centroids[k][1], contested_sigma_mm)
            lo, hi = boxes[k]
            a, b = lo - roi_lo, hi - roi_lo
            sl = (slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0]))
            # claimed (> 0.5); against an earlier claim the distance-weighed probability decides
            win = (p > 0.5) & ((owner[sl] == 0) | (weighed > best[sl]))
            best[sl][win] = weighed[win]
            owner[sl][win] = k + 1
        owner = _largest_components(owner)
        labels_lut = np.zeros(256, np.uint8)
        for k, (lab, _) in enumerate(centroids):
            labels_lut[k + 1] = lab
        counts = np.bincount(owner.ravel(), minlength=len(centroids) + 1)
        label_arr[roi_lo[2]:roi_hi[2], roi_lo[1]:roi_hi[1], roi_lo[0]:roi_hi[0]] = labels_lut[owner]
        del best, owner
    else:
        counts = np.zeros(len(centroids) + 1, int)
    for k, ((lab, c), ref) in enumerate(zip(centroids, refs)):
        fg = probs[k, NORMAL] + probs[k, FRACTURED]
        sel = fg > 0.5
        score = float(probs[k, FRACTURED][sel].sum() / max(fg[sel].sum(), 1e-6)) if sel.any() else 0.0
        vertebrae.append(SegmentedVertebra(label=int(lab), centroid_mm=tuple(float(v) for v in c),
                                           fracture_score=score, voxels=int(counts[k + 1]),
                                           foreground=fg.astype(np.float32), crop=ref, fine=fines[k]))
    label_map = sitk.GetImageFromArray(label_arr)
    label_map.CopyInformation(image)
    return SegmentationResult(label_map=label_map, vertebrae=vertebrae)


def _largest_components(owner: np.ndarray) -> np.ndarray:
    """Keep, for every owner value, only its largest 6-connected component."""
    import cc3d

    cc = cc3d.connected_components(owner, connectivity=6)
    n = int(cc.max())
    if n == 0:
        return owner
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    comp_owner = np.zeros(n + 1, np.int64)
    # owner of each component (all its voxels share it)
    flat_cc, flat_ow = cc.ravel(), owner.ravel()
    nz = flat_cc > 0
    comp_owner[flat_cc[nz]] = flat_ow[nz]
    keep = np.zeros(n + 1, bool)
    best_size: dict[int, tuple[int, int]] = {}
    for comp in range(1, n + 1):
        o = int(comp_owner[comp])
        if o and (o not in best_size or sizes[comp] > best_size[o][0]):
            best_size[o] = (int(sizes[comp]), comp)
    for _, comp in best_size.values():
        keep[comp] = True
    return np.where(keep[cc], owner, 0).astype(np.uint8)
