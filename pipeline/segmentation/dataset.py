"""Training samples of the segmentation network: one crop per vertebra of a phantom or VerSe case.

A sample is cut exactly as at inference (:func:`pipeline.segmentation.crops.ct_crop`, from the
study's own acquisition grid), but ``margin`` voxels larger on each side so that training can
draw random translations (the localization error the network must tolerate). Its target is the
*occupancy* of the centre vertebra in each 2 mm voxel (0..8 eighths, from the labels at 1 mm):
trained on soft targets, the network's probability is a partial-volume estimate, so that its
linear resampling back onto a fine source grid puts the 0.5 boundary within a voxel, not on the
2 mm staircase. Neighbouring vertebrae are background (the paper's "only the current vertebra").
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.segmentation.crops import CROP_SIZE, CROP_SPACING_MM, ct_crop, occupancy

#: Extra voxels on each side of a training crop: random shifts up to +-MARGIN voxels (2 mm each).
MARGIN = 4
#: The same shift range in mm, for crops of another spacing (:func:`margin_for`).
MARGIN_MM = MARGIN * CROP_SPACING_MM


def margin_for(spacing_mm: float) -> int:
    """Voxels of margin that give crops of ``spacing_mm`` the shifts of :data:`MARGIN_MM`."""
    return max(1, int(round(MARGIN_MM / float(spacing_mm))))


@dataclass
class Sample:
    ct_hu: np.ndarray        # float16 [n, n, n], n = CROP_SIZE + 2 MARGIN
    occupancy: np.ndarray    # uint8 [n, n, n] 0..8 eighths of the voxel inside the centre vertebra
    fractured: bool
    label: int
    name: str


def case_samples(name: str, ct: sitk.Image, labels: sitk.Image, vertebrae: Iterable[dict],
                 size: int = CROP_SIZE, spacing_mm: float = CROP_SPACING_MM,
                 margin: int = MARGIN) -> list[Sample]:
    """One :class:`Sample` per vertebra (gt dicts with ``label``, ``centroid_mm``, ``fractured``)."""
    n = size + 2 * margin
    out = []
    for v in vertebrae:
        c = v["centroid_mm"]
        out.append(Sample(ct_hu=ct_crop(ct, c, n, spacing_mm).astype(np.float16),
                          occupancy=occupancy(labels, int(v["label"]), c, n, spacing_mm),
                          fractured=bool(v.get("fractured", False)), label=int(v["label"]),
                          name=f"{name}/{v.get('name', v['label'])}"))
    return out


def save_samples(samples: Sequence[Sample], path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ct=np.stack([s.ct_hu for s in samples]), occ=np.stack([s.occupancy for s in samples]),
             fractured=np.array([s.fractured for s in samples]), label=np.array([s.label for s in samples]),
             name=np.array([s.name for s in samples]))
    tmp.replace(path)


def load_samples(path: Path) -> list[Sample]:
    with np.load(path) as z:  # each z[key] reads the whole array: read each once
        ct, occ, fr, lab, names = z["ct"], z["occ"], z["fractured"], z["label"], z["name"]
    return [Sample(ct[i], occ[i], bool(fr[i]), int(lab[i]), str(names[i])) for i in range(len(lab))]


def augmented_batch(samples: Sequence[Sample], rng: np.random.Generator, size: int = CROP_SIZE,
                    shift: bool = True, flip: bool = True, intensity: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A batch ``(x [b,1,n,n,n] z-scored, target [b,3,n,n,n] soft class probabilities)``.

    Augmentation (paper section 3.2): random translation (the crop's offset, up to the margin),
    left-right flip (an antero-posterior or cranio-caudal flip makes anatomy that never occurs),
    and a small random HU gain/offset for scanner calibration.
    """
    from pipeline.segmentation.crops import normalise

    xs, ts = [], []
    for s in samples:
        full = s.ct_hu.shape[0]
        m = (full - size) // 2
        o = rng.integers(0, full - size + 1, size=3) if shift else np.array([m, m, m])
        sl = tuple(slice(int(a), int(a) + size) for a in o)
        hu = s.ct_hu[sl].astype(np.float32)
        occ = s.occupancy[sl].astype(np.float32) / 8.0
        if flip and rng.random() < 0.5:
            hu, occ = hu[:, :, ::-1], occ[:, :, ::-1]
        if intensity:
            hu = hu * rng.uniform(0.92, 1.08) + rng.uniform(-30, 30)
        x = normalise(hu)
        t = np.stack([1.0 - occ, occ * (not s.fractured), occ * s.fractured])
        xs.append(x[None])
        ts.append(t)
    return np.ascontiguousarray(np.stack(xs), np.float32), np.ascontiguousarray(np.stack(ts), np.float32)
