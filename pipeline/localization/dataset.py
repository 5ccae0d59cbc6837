"""Training data of the localization network: phantom studies or a VerSe layout.

A :class:`Case` is one volume on the network's grid (reoriented, resampled, clamped, z-scored,
see :mod:`pipeline.preprocess`) with the continuous voxel index of each level's centroid.
Cases are cached as ``.npz`` files so that a phantom is generated once, not per epoch.
:class:`PatchSampler` draws augmented patches and their Gaussian targets (paper section 3.2:
random rotation, flip and translation).

Flips are left-right only: a cranio-caudal flip would swap level identities, and an
antero-posterior flip gives an anatomy the network never meets.

Partial vertebrae (cut by the field of view; gt ``partial``) are kept as targets when their
centroid lies inside the volume: they are really there, and their identity anchors the chain of
labels. See docs/archive/model-card-history.md for how evaluation counts them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from pipeline.levels import BY_LABEL, N_LEVELS
from pipeline.localization.heatmaps import gaussian_heatmaps
from pipeline.preprocess import prepare
from pipeline.seeds import refuse_evaluation_seeds


@dataclass
class Case:
    """One training volume on the network grid.

    Attributes:
        name: an identifier (``phantom-17``, a VerSe case folder name).
        array: ``[z, y, x]`` float32, z-scored.
        centers: ``(N_LEVELS, 3)`` continuous voxel indices ``[z, y, x]``; NaN rows for levels
            absent or with a centroid outside the volume.
        partial: ``(N_LEVELS,)`` bool, the level is cut by the field of view.
        pad_value: the normalised value of air, used beyond the volume.
        spacing_mm: grid spacing.
    """

    name: str
    array: np.ndarray
    centers: np.ndarray
    partial: np.ndarray
    pad_value: float
    spacing_mm: float

    def save(self, path: Path) -> None:
        np.savez(path, array=self.array.astype(np.float16), centers=self.centers, partial=self.partial,
                 pad_value=self.pad_value, spacing_mm=self.spacing_mm, name=self.name)

    @classmethod
    def load(cls, path: Path) -> "Case":
        z = np.load(path)
        return cls(str(z["name"]), z["array"].astype(np.float32), z["centers"], z["partial"],
                   float(z["pad_value"]), float(z["spacing_mm"]))


def make_case(name: str, ct: sitk.Image, centroids_mm: dict[int, Sequence[float]], spacing_mm: float,
              partial_labels: Iterable[int] = ()) -> Case:
    """A :class:`Case` from an image and VerSe-labelled centroids in patient LPS millimetres."""
    prep = prepare(ct, spacing_mm)
    centers = np.full((N_LEVELS, 3), np.nan)
    partial = np.zeros(N_LEVELS, bool)
    shape = np.array(prep.array.shape)
    partial_labels = set(partial_labels)
    for label, xyz in centroids_mm.items():
        if int(label) not in BY_LABEL:
            continue
        k = BY_LABEL[int(label)].order
        idx = prep.mm_to_index([xyz])[0]
        if np.all(idx >= -0.5) and np.all(idx <= shape - 0.5):
            centers[k] = idx
        partial[k] = int(label) in partial_labels
    return Case(name, prep.array, centers, partial, float(prep.pad_value), float(spacing_mm))


def phantom_case(seed: int, spacing_mm: float, phantom_spacing_mm: float = 2.0) -> Case:
    """A phantom study (``pipeline.phantom.generate``) as a :class:`Case`."""
    refuse_evaluation_seeds([seed])
    from pipeline.phantom import generate

    ph = generate(seed, spacing_mm=phantom_spacing_mm)
    verts = ph.gt["vertebrae"]
    return make_case(f"phantom-{seed}", ph.ct, {v["label"]: v["centroid_mm"] for v in verts}, spacing_mm,
                     [v["label"] for v in verts if v.get("partial")])


def phantom_cache_path(cache_dir: Path, seed: int, spacing_mm: float) -> Path:
    """Where phantom ``seed``'s case is cached, keyed on the phantom's version
    (``PHANTOM_VERSION``, bumped whenever a seed starts to give a different phantom)."""
    from pipeline.phantom.generator import PHANTOM_VERSION

    return Path(cache_dir) / f"phantom-{seed}-{spacing_mm:g}mm-v{PHANTOM_VERSION}.npz"


def write_phantom_case(seed: int, spacing_mm: float, cache_dir: Path) -> Path:
    """Generate phantom ``seed`` on the ``spacing_mm`` grid and cache it (written whole or not
    at all)."""
    path = phantom_cache_path(cache_dir, seed, spacing_mm)
    tmp = path.with_suffix(".tmp.npz")
    phantom_case(seed, spacing_mm).save(tmp)
    tmp.replace(path)
    return path


def cached_phantom_cases(seeds: Iterable[int], spacing_mm: float, cache_dir: Path,
                         log=print, workers: int = 1) -> list[Case]:
    """Phantom cases, generated once and cached under ``cache_dir`` (the missing ones by
    ``workers`` processes, :func:`pipeline.training.generate_parallel`)."""
    from functools import partial

    from pipeline.training import generate_parallel

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    missing = [s for s in seeds if not phantom_cache_path(cache_dir, s, spacing_mm).exists()]
    generate_parallel(missing, partial(write_phantom_case, spacing_mm=spacing_mm,
                                       cache_dir=cache_dir), workers, log)
    return [Case.load(phantom_cache_path(cache_dir, s, spacing_mm)) for s in seeds]


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation matrix in ``[z, y, x]`` index space from three angles (radians)."""
    a, b, c = angles
    rz = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])  # about z
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])  # about y
    rx = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])  # about x
    return rz @ ry @ rx


class PatchSampler:
    """Random augmented patches with Gaussian heatmap targets.

    Augmentation (paper section 3.2): rotation (uniform, +-``rotate_deg`` about each axis),
    scaling (+-``scale``), left-right flip, translation (the patch centre is a random present
    centroid plus a uniform offset of up to a third of the patch, or with probability
    ``1 - spine_bias`` anywhere in the volume), and an intensity scale/shift (+-``intensity``).
    """

    def __init__(self, cases: Sequence[Case], patch: Sequence[int], sigma_vox: float, seed: int,
                 rotate_deg: float = 10.0, scale: float = 0.1, flip: bool = True,
                 intensity: float = 0.1, spine_bias: float = 0.9, amplitude: float = 1.0) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch)
        self.sigma = float(sigma_vox)
        self.rng = np.random.default_rng(seed)
        self.rotate = math.radians(rotate_deg)
        self.scale, self.flip, self.intensity, self.spine_bias = scale, flip, intensity, spine_bias
        self.amplitude = float(amplitude)
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in self.patch], indexing="ij")
        self._out = torch.stack(grids, -1).reshape(-1, 3)  # output voxel indices [z, y, x]
        self._out_center = (np.array(self.patch) - 1) / 2

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.rng
        case = self.cases[rng.integers(len(self.cases))]
        shape = np.array(case.array.shape)
        present = np.flatnonzero(~np.isnan(case.centers[:, 0]))
        if len(present) and rng.random() < self.spine_bias:
            c_in = case.centers[rng.choice(present)] + rng.uniform(-1, 1, 3) * np.array(self.patch) / 3
        else:
            c_in = rng.uniform(0, 1, 3) * (shape - 1)
        a = _rotation(rng.uniform(-self.rotate, self.rotate, 3)) * rng.uniform(1 - self.scale, 1 + self.scale)
        if self.flip and rng.random() < 0.5:
            a = a @ np.diag([1.0, 1.0, -1.0])  # left-right (x) only
        # input index = a @ (output index - output centre) + c_in
        src = (self._out - torch.from_numpy(self._out_center)) @ torch.from_numpy(a).T + torch.from_numpy(c_in)
        norm = 2 * src / torch.from_numpy(np.maximum(shape - 1, 1)) - 1
        grid = norm[:, [2, 1, 0]].reshape(1, *self.patch, 3).float()
        vol = torch.from_numpy(case.array)[None, None] - case.pad_value
        x = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        x = x + case.pad_value
        if self.intensity:
            x = x * rng.uniform(1 - self.intensity, 1 + self.intensity) + rng.uniform(-self.intensity, self.intensity)
        inv = np.linalg.inv(a)
        centers = (case.centers - c_in) @ inv.T + self._out_center
        return x, gaussian_heatmaps(self.patch, centers, self.sigma, self.amplitude)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.sample() for _ in range(n)))
        return torch.stack(xs), torch.stack(ys)
