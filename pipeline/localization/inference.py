"""Vertebra localisation and labelling of a whole CT volume (paper section 2.2; issue 4).

1. :func:`pipeline.preprocess.prepare`: reorient (LPS), resample to the model's grid, clamp,
   z-score.
2. :func:`predict_heatmaps`: overlapping patches over the whole volume, blended with a tapered
   weight so that patch borders (where a patch lacks context) count less.
3. :func:`decode`: per channel the maximum (eq. 2), refined to sub-voxel precision, kept when it
   exceeds the presence threshold.
4. :func:`plausible_chain`: the labels must read in anatomical order along the spine (cranial to
   caudal), neighbours at a plausible distance, and no two levels on one vertebra; of the
   candidates, the highest-scoring subset that obeys these rules is kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.levels import LEVELS
from pipeline.localization.heatmaps import channel_peaks
from pipeline.preprocess import Prepared, prepare

#: Defaults of the plausibility pass, in mm (overridable by the model's metadata).
MIN_SEPARATION_MM = 9.0      # two detections closer than this sit on one vertebra
MAX_STEP_MM = 55.0           # adjacent levels are never further apart (lumbar ~35-40 mm)
MIN_CAUDAL_COS = 0.3         # the step to the next level points caudally (lordosis/kyphosis allowed)
OPTIONAL_LEVELS = frozenset({"T13", "L6"})  # transitional: may be absent between present levels


@dataclass(frozen=True)
class LocalizedVertebra:
    """A localised, labelled vertebra.

    Attributes:
        label: VerSe label number.
        name: level name (``"L1"``).
        centroid_mm: patient LPS millimetres.
        score: peak height of the heatmap in units of the target peak (about 1 when confident).
        partial: the vertebra seems cut by the field of view (its centroid lies within half a
            vertebra of the first or last slice).
    """

    label: int
    name: str
    centroid_mm: tuple[float, float, float]
    score: float
    partial: bool = False


def _starts(size: int, patch: int, overlap: float) -> list[int]:
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    return sorted({round(i * (size - patch) / (n - 1)) for i in range(n)})


def _taper(patch: Sequence[int]) -> np.ndarray:
    """Separable blending weight: 1 in the middle, falling linearly to 0.1 at the borders."""
    w = None
    for d, n in enumerate(patch):
        t = 1 - np.abs(np.linspace(-1, 1, n))
        t = np.clip(0.1 + 1.8 * t, 0.1, 1.0)
        t = t.reshape([-1 if i == d else 1 for i in range(len(patch))])
        w = t if w is None else w * t
    return w.astype(np.float32)


@torch.no_grad()
def predict_heatmaps(model: torch.nn.Module, array: np.ndarray, patch: Sequence[int], pad_value: float,
                     overlap: float = 0.25, device: torch.device | str = "cpu") -> np.ndarray:
    """Heatmaps ``(C, *array.shape)`` from overlapping patches over the whole volume."""
    patch = tuple(int(p) for p in patch)
    shape = array.shape
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch))
    vol = np.full(padded_shape, pad_value, dtype=np.float32)
    vol[tuple(slice(0, s) for s in shape)] = array
    out = None
    weight = np.zeros(padded_shape, np.float32)
    taper = _taper(patch)
    starts = [_starts(s, p, overlap) for s, p in zip(padded_shape, patch)]
    model.eval()
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                inp = torch.from_numpy(np.ascontiguousarray(vol[sl]))[None, None].to(device)
                h = model(inp)[0].float().cpu().numpy()
                if out is None:
                    out = np.zeros((h.shape[0],) + padded_shape, np.float32)
                out[(slice(None),) + sl] += h * taper
                weight[sl] += taper
    out /= weight
    return out[(slice(None),) + tuple(slice(0, s) for s in shape)]


def _min_gap(k_from: int, k_to: int) -> int:
    """Fewest vertebrae between two levels' orders: the optional T13/L6 may be absent."""
    return max(1, sum(1 for k in range(k_from + 1, k_to + 1) if LEVELS[k].name not in OPTIONAL_LEVELS))


def plausible_chain(orders: Sequence[int], positions_mm: np.ndarray, scores: Sequence[float],
                    min_separation_mm: float = MIN_SEPARATION_MM, max_step_mm: float = MAX_STEP_MM,
                    min_caudal_cos: float = MIN_CAUDAL_COS) -> list[int]:
    """Indices of the highest-scoring candidates that form an anatomically plausible spine.

    Dynamic programming over candidates sorted by level order: a candidate may follow another
    when its level is more caudal, it lies caudal of it (patient -z in LPS, the step's cosine with
    the caudal direction at least ``min_caudal_cos``), at least ``min_separation_mm`` away per
    vertebra between them and at most ``max_step_mm`` per level step.
    """
    idx = sorted(range(len(orders)), key=lambda i: orders[i])
    best: dict[int, float] = {}
    prev: dict[int, int | None] = {}
    for a, i in enumerate(idx):
        best[i], prev[i] = float(scores[i]), None
        for j in idx[:a]:
            if orders[j] >= orders[i]:
                continue
            step = positions_mm[i] - positions_mm[j]
            dist = float(np.linalg.norm(step))
            n_min = _min_gap(orders[j], orders[i])
            n_max = orders[i] - orders[j]
            if dist < min_separation_mm * n_min or dist > max_step_mm * n_max:
                continue
            if -step[2] < min_caudal_cos * dist:
                continue
            if best[j] + float(scores[i]) > best[i]:
                best[i], prev[i] = best[j] + float(scores[i]), j
    if not best:
        return []
    end = max(best, key=best.get)
    chain = []
    while end is not None:
        chain.append(end)
        end = prev[end]
    return sorted(chain, key=lambda i: orders[i])


def decode(heatmaps: np.ndarray, prep: Prepared, threshold: float,
           plausibility: bool = True) -> list[LocalizedVertebra]:
    """Vertebrae from heatmaps: peak per channel, presence threshold, plausibility pass."""
    positions, values = channel_peaks(heatmaps)
    orders = [k for k in range(len(values)) if values[k] >= threshold]
    if not orders:
        return []
    mm = prep.index_to_mm(positions[orders])
    keep = plausible_chain(orders, mm, values[orders]) if plausibility else list(range(len(orders)))
    kept_mm = mm[keep]
    result = []
    z_extent = _z_extent_mm(prep.image)
    for n, i in enumerate(keep):
        k = orders[i]
        others = np.delete(kept_mm, n, axis=0)
        spacing = float(np.min(np.linalg.norm(others - mm[i], axis=1))) if len(others) else 30.0
        edge = min(mm[i][2] - z_extent[0], z_extent[1] - mm[i][2])
        result.append(LocalizedVertebra(
            label=LEVELS[k].label, name=LEVELS[k].name,
            centroid_mm=tuple(round(float(c), 3) for c in mm[i]), score=float(values[k]),
            partial=bool(edge < 0.4 * spacing)))
    return result


def _z_extent_mm(image: sitk.Image) -> tuple[float, float]:
    """Lowest and highest patient z (mm) of the volume's voxel centres."""
    size = image.GetSize()
    zs = [image.TransformIndexToPhysicalPoint((0, 0, 0))[2],
          image.TransformIndexToPhysicalPoint((0, 0, size[2] - 1))[2]]
    return min(zs), max(zs)


def localize(image: sitk.Image, device: str = "auto", model: torch.nn.Module | None = None,
             timings: dict[str, float] | None = None) -> list[LocalizedVertebra]:
    """Localise and label the vertebrae of a CT volume (float HU, any orientation).

    ``model`` defaults to the shipped ``localization`` weights (:func:`pipeline.registry.load_model`);
    its ``meta`` holds the grid spacing, the patch size and the presence threshold.
    """
    from pipeline.registry import load_model, resolve_device

    t0 = time.perf_counter()
    dev = resolve_device(device)
    if model is None:
        model = load_model("localization", str(dev))
    meta = getattr(model, "meta", {})
    t1 = time.perf_counter()
    prep = prepare(image, float(meta.get("spacing_mm", 4.0)))
    t2 = time.perf_counter()
    heatmaps = predict_heatmaps(model, prep.array, meta.get("patch", (64, 64, 64)), prep.pad_value,
                                float(meta.get("overlap", 0.25)), dev) / float(meta.get("amplitude", 1.0))
    t3 = time.perf_counter()
    found = decode(heatmaps, prep, float(meta.get("threshold", 0.3)))
    if timings is not None:
        timings.update({"load_model": t1 - t0, "preprocess": t2 - t1, "network": t3 - t2,
                        "decode": time.perf_counter() - t3})
    return found
