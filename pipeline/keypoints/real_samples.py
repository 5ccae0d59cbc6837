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
from pipeline.realdata.truth import whole_truth


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
        ct, mask, verts = whole_truth(case)
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
    return KeypointSamples.concat(parts)


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


def synth_keypoint_samples(masks, cases: int, n_aug: int, seed: int = 0, crops: int = 3,
                           fractured_share: float = 0.33,
                           log: Callable[[str], None] = lambda s: None) -> KeypointSamples:
    """Planes of CT synthesised from real masks (:mod:`pipeline.synthesis`: re-posed, fractured,
    rendered with random appearance), ``cases`` cases round robin over ``masks``
    (:func:`pipeline.synthesis.seg_source.find_masks`, the train side of the split): per case a
    random level and its neighbours (``crops`` levels), the first fractured with probability
    ``fractured_share``; each whole one gives ``n_aug`` planes with its points placed on its
    posed (and fractured) mask, graded as synthesised."""
    from pipeline.synthesis.generate import render_case
    from pipeline.synthesis.geometry import label_centroids, level_sorted
    from pipeline.synthesis.seg_source import SEG_SYNTH_OPTIONS, posed_case

    rng = np.random.default_rng(seed)
    parts: list[KeypointSamples] = []
    for k in range(cases):
        mask = masks[k % len(masks)]
        posed = posed_case(mask, rng, SEG_SYNTH_OPTIONS, crops, fractured_share)
        if posed is None:
            continue
        case, targets, whole = posed
        cents = label_centroids(case.labels)
        rendered = render_case(case, rng, SEG_SYNTH_OPTIONS, focus_mm=cents[targets[0]],
                               half_width_mm=70.0)
        order = level_sorted(cents)
        ups = dict(zip(order, spine_axes([level(int(lab)).order for lab in order],
                                         [cents[lab] for lab in order])))
        verts, fgs = [], []
        for lab in targets:
            if lab not in whole or lab not in rendered.centroids_mm:
                continue
            kp = mask_keypoints_mm(rendered.labels, lab, cents[lab], ups[lab])
            if kp is None:
                continue
            grade = rendered.fractures.get(lab, (0, "normal"))[0]
            verts.append({"label": int(lab), "name": level(int(lab)).name,
                          "centroid_mm": cents[lab], "keypoints_mm": kp, "genant_grade": int(grade)})
            fgs.append(sitk.Cast(rendered.labels == int(lab), sitk.sitkFloat32))
        if verts:
            parts.append(keypoint_samples(rendered.ct, verts, fgs, rng, n_aug,
                                          f"synth-{k}/{mask.subject}"))
        log(f"synthetic case {k + 1}/{cases} from {mask.subject}: {len(verts)} vertebrae")
    if not parts:
        raise ValueError("no synthetic vertebra with a body section: no keypoint planes")
    return KeypointSamples.concat(parts)


def cached_synth_keypoint_samples(data: Path, cache_dir: Path, cases: int, n_aug: int,
                                  seed: int = 0, log: Callable[[str], None] = lambda s: None
                                  ) -> KeypointSamples:
    """:func:`synth_keypoint_samples` from the masks of ``data`` (the real-spine pack: its train
    side only; another folder: all its masks), cached under ``cache_dir``."""
    from pipeline.realdata.pack import is_pack
    from pipeline.synthesis.seg_source import CACHE_VERSION, find_masks, training_subjects

    data = Path(data)
    masks = find_masks(data, training_subjects() if is_pack(data) else None)
    if not masks:
        raise ValueError(f"no VerSe vertebra mask under {data}: nothing to synthesise from")
    key = "pack-train" if is_pack(data) else f"folder-{data.name}"
    path = Path(cache_dir) / f"kp-synth{CACHE_VERSION}-{key}-n{cases}-a{n_aug}-s{seed}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_keypoint_samples(synth_keypoint_samples(masks, cases, n_aug, seed, log=log), path)
    return load_keypoint_samples([path])
