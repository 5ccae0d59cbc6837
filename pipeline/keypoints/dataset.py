"""Training samples of the keypoint network: mid-sagittal planes with the six Genant points.

Each vertebra gives ``n_aug`` planes through (near) its body, jittered as inference will see
them: the plane's centre moves by up to ``max_shift_mm`` around the true body centre (the mean of
the six keypoints; inference centres its second pass on the first pass's points,
:func:`pipeline.keypoints.infer.locate_keypoints`), the plane turns by up to
``max_angle`` degrees in the sagittal plane (paper section 3.2: rotation, translation) and its
x position moves by up to 1.5 mm (localization error), and the spine axis tilts by a few
degrees out of the plane. The plane follows the spine axis from the neighbouring centroids
(:func:`pipeline.keypoints.plane.spine_axes`), as at inference. The mask channel is the vertebra's
occupancy at the segmentation network's 2 mm grid, i.e. what the segmentation gives at inference.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.infer import plane_input
from pipeline.keypoints.plane import PLANE_SIZE, PLANE_SPACING_MM, sagittal_plane


@dataclass
class KeypointSamples:
    inputs: np.ndarray      # float16 [n, 2, S, S]
    points: np.ndarray      # float32 [n, 6, 2] (row, col) pixel coordinates
    grades: np.ndarray      # int8 [n] gt Genant grade of the vertebra (for stratified checks)
    names: np.ndarray       # str [n]

    @classmethod
    def concat(cls, parts: Iterable["KeypointSamples"]) -> "KeypointSamples":
        """The samples of ``parts``, one after another."""
        parts = list(parts)
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("inputs", "points", "grades", "names")))


def vertebra_planes(ct: sitk.Image, fg: sitk.Image, vertebra: dict, up: np.ndarray,
                    rng: np.random.Generator, n_aug: int, max_angle: float = 6.0, max_shift_mm: float = 5.0,
                    size: int = PLANE_SIZE, spacing_mm: float = PLANE_SPACING_MM
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n_aug`` jittered planes (the first without jitter) and their keypoints in pixels."""
    kp = vertebra["keypoints_mm"]
    centre = np.mean([np.asarray(kp[n], float) for n in KEYPOINT_NAMES], axis=0)
    ins, pts = [], []
    for k in range(n_aug):
        jit = np.zeros(3) if k == 0 else np.array([rng.uniform(-1.5, 1.5),
                                                     *rng.uniform(-max_shift_mm, max_shift_mm, 2)])
        angle = 0.0 if k == 0 else float(rng.uniform(-max_angle, max_angle))
        # the axis from neighbouring centroids is itself uncertain: tilt it out of plane a little
        u = np.asarray(up, float) + (0 if k == 0 else rng.normal(0, 0.04, 3))
        plane = sagittal_plane(centre + jit, u, size, spacing_mm, angle)
        ins.append(plane_input(ct, fg, plane).astype(np.float16))
        pts.append(np.array([plane.to_px(kp[n]) for n in KEYPOINT_NAMES], np.float32))
    return ins, pts


def keypoint_samples(ct: sitk.Image, vertebrae: Iterable[dict], fg_images: Sequence[sitk.Image],
                     rng: np.random.Generator, n_aug: int, name: str = "") -> KeypointSamples:
    from pipeline.keypoints.plane import spine_axes
    from pipeline.levels import level

    vertebrae = list(vertebrae)
    ups = spine_axes([level(int(v["label"])).order for v in vertebrae], [v["centroid_mm"] for v in vertebrae])
    ins, pts, grades, names = [], [], [], []
    for v, fg, up in zip(vertebrae, fg_images, ups):
        if not v.get("keypoints_mm") or v.get("partial"):
            continue
        i, p = vertebra_planes(ct, fg, v, up, rng, n_aug)
        ins += i
        pts += p
        grades += [int(v.get("genant_grade", 0))] * len(i)
        names += [f"{name}/{v.get('name', v['label'])}"] * len(i)
    s = PLANE_SIZE
    return KeypointSamples(np.stack(ins) if ins else np.zeros((0, 2, s, s), np.float16),
                           np.stack(pts) if pts else np.zeros((0, 6, 2), np.float32),
                           np.array(grades, np.int8), np.array(names))


def save_keypoint_samples(s: KeypointSamples, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, inputs=s.inputs, points=s.points, grades=s.grades, names=s.names)
    tmp.replace(path)


def load_keypoint_samples(paths: Iterable[Path]) -> KeypointSamples:
    return KeypointSamples.concat(
        KeypointSamples(z["inputs"], z["points"], z["grades"], z["names"])
        for z in (np.load(p) for p in paths))
