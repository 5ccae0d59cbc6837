"""Training planes of the keypoint network from real CT with expert vertebra masks.

Real scans carry no keypoint annotations. Each whole vertebra's six Genant points are placed on
its expert mask's section in the vertebra's own mid-sagittal plane
(:func:`pipeline.keypoints.truth.keypoints_from_mask`: the body's upper and lower endplates at
``-edge``, 0 and ``+edge`` of their half length), the plane following the spine's local axis from
the neighbouring true centroids (:func:`pipeline.keypoints.plane.spine_axes`), as at inference.
From those points the planes are cut and jittered exactly as the phantom's
(:func:`pipeline.keypoints.dataset.keypoint_samples`); the mask channel is the expert mask's
occupancy of the vertebra.

Which cases: :func:`pipeline.realdata.samples.training_cases` (the real-spine pack's ``train``
side of ``pipeline/realdata/split.json``, or every case of another VerSe-layout folder).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.dataset import (
    KeypointSamples,
    keypoint_samples,
    load_keypoint_samples,
    save_keypoint_samples,
)
from pipeline.keypoints.plane import PLANE_SIZE, PLANE_SPACING_MM, sagittal_plane, spine_axes
from pipeline.keypoints.truth import keypoints_from_mask
from pipeline.levels import level
from pipeline.realdata.pack import RealCase
from pipeline.realdata.truth import axial_lps, truth_vertebrae


def mask_keypoints_mm(mask: sitk.Image, label: int, centroid_mm, up) -> dict[str, tuple] | None:
    """The six points (LPS mm) of vertebra ``label`` on its mask's mid-sagittal section through
    ``centroid_mm`` across the local axis ``up``; ``None`` where the section shows no body."""
    plane = sagittal_plane(centroid_mm, up, PLANE_SIZE, PLANE_SPACING_MM)
    section = plane.sample(sitk.Cast(mask == int(label), sitk.sitkUInt8), linear=False) > 0
    points = keypoints_from_mask(section)
    if points is None:
        return None
    return {n: tuple(float(v) for v in plane.to_mm(points[n])) for n in KEYPOINT_NAMES}


def real_keypoint_samples(cases: Iterable[RealCase], n_aug: int, seed: int = 0,
                          log: Callable[[str], None] = lambda s: None) -> KeypointSamples:
    """Jittered planes (``n_aug`` per vertebra, the first unjittered) of every whole vertebra
    of ``cases`` whose mask section shows a body. An expert's Genant grade is kept for the
    fracture share of the batches; an ungraded vertebra counts as grade 0."""
    rng = np.random.default_rng(seed)
    parts: list[KeypointSamples] = []
    for case in cases:
        ct, mask = axial_lps(case.ct), axial_lps(case.mask)
        verts = [v for v in truth_vertebrae(case, mask)
                 if not v["partial"] and np.all(np.isfinite(v["centroid_mm"]))]
        ups = spine_axes([level(int(v["label"])).order for v in verts],
                         [v["centroid_mm"] for v in verts])
        usable, fgs = [], []
        for v, up in zip(verts, ups):
            kp = mask_keypoints_mm(mask, v["label"], v["centroid_mm"], up)
            if kp is None:
                continue
            usable.append(dict(v, keypoints_mm=kp, genant_grade=int(v["genant_grade"] or 0)))
            fgs.append(sitk.Cast(mask == int(v["label"]), sitk.sitkFloat32))
        part = keypoint_samples(ct, usable, fgs, rng, n_aug, f"real-{case.case_id}")
        log(f"real case {case.case_id}: {len(usable)} of {len(verts)} whole vertebrae, "
            f"{len(part.inputs)} planes")
        parts.append(part)
    if not parts or not sum(len(p.inputs) for p in parts):
        raise ValueError("no real vertebra with a body section: no keypoint planes")
    return KeypointSamples(*(np.concatenate([getattr(p, f) for p in parts])
                             for f in ("inputs", "points", "grades", "names")))


def cached_real_keypoint_samples(data: Path, cache_dir: Path, n_aug: int, seed: int = 0,
                                 log: Callable[[str], None] = lambda s: None) -> KeypointSamples:
    """:func:`real_keypoint_samples` of the training cases of ``data``, cached under
    ``cache_dir`` (by the cases' key, ``n_aug`` and ``seed``)."""
    from pipeline.realdata.samples import training_cases

    key, cases = training_cases(Path(data))
    path = Path(cache_dir) / f"kp-real-{key}-a{n_aug}-s{seed}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_keypoint_samples(real_keypoint_samples(cases(), n_aug, seed, log), path)
    return load_keypoint_samples([path])
