"""Neighbour levels beyond the ends of a mask (a real spine does not stop where its mask does).

Expert masks often cover a few levels only (sub-verse010: L1-L5), while the scan they came from
showed T12 above L1. Rendered as it is, such a mask would put soft tissue above L1, and a network
would learn that the first vertebra has no neighbour. Where an end vertebra is complete (it does
not touch the source image's border), a copy of it, shifted by one inter-vertebral step along
the spine and slightly rescaled, is added as the next level (its VerSe label). Below L5 / L6 the
renderer draws the sacrum instead. Copies are labelled, since they are vertebrae a localisation
network must find; their shape is only approximately that of the real next level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.levels import BY_LABEL, LEVELS
from pipeline.synthesis.geometry import as_label_image, label_centroids, level_sorted

#: Levels never made by extension (rare variants: T13, L6) and never extended below (L5, L6).
RARE = (28, 25)
NO_EXTENSION_BELOW = (24, 25)
#: Area (mm2) of a label on the image border above which it counts as cut by the field of view.
TRUNCATION_AREA_MM2 = 300.0


@dataclass
class Extension:
    """The extended maps and the labels that were added."""

    labels: sitk.Image
    subregions: sitk.Image | None
    added: tuple[int, ...]


def truncated_labels(labels: sitk.Image, min_area_mm2: float = TRUNCATION_AREA_MM2) -> set[int]:
    """Labels cut by the border of their image (the scan's field of view): more than
    ``min_area_mm2`` of the label lies on the image's outer faces. A process tip clipped by a
    tight crop around the spine (~100-200 mm2) does not count; a body cut across (> 1000 mm2)
    does."""
    arr = sitk.GetArrayFromImage(as_label_image(labels))
    sx, sy, sz = labels.GetSpacing()
    faces = ((arr[0], sx * sy), (arr[-1], sx * sy), (arr[:, 0], sx * sz), (arr[:, -1], sx * sz),
             (arr[:, :, 0], sy * sz), (arr[:, :, -1], sy * sz))
    area: dict[int, float] = {}
    for face, unit in faces:
        vals, counts = np.unique(face, return_counts=True)
        for v, c in zip(vals, counts):
            if v:
                area[int(v)] = area.get(int(v), 0.0) + float(c) * unit
    return {lab for lab, a in area.items() if a > min_area_mm2}


def next_level(label: int, step: int) -> int | None:
    """The VerSe label ``step`` (-1 above, +1 below) from ``label``, skipping T13 and L6."""
    k = BY_LABEL[label].order + step
    while 0 <= k < len(LEVELS):
        if LEVELS[k].label not in RARE:
            return LEVELS[k].label
        k += step
    return None


def _copy(labels: sitk.Image, label: int, offset: np.ndarray, scale: float, centre: np.ndarray,
          new_label: int, values: sitk.Image | None = None) -> np.ndarray:
    """``label`` of ``labels`` (or the ``values`` under it) moved by ``offset`` and scaled by
    ``scale`` about its centre, as a uint8 array with ``new_label`` (or the values)."""
    src = sitk.GetArrayFromImage(as_label_image(labels))
    if values is None:
        arr = np.where(src == label, new_label, 0).astype(np.uint8)
    else:
        arr = np.where(src == label, sitk.GetArrayFromImage(as_label_image(values)), 0)
        arr = arr.astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(labels)
    tx = sitk.AffineTransform(3)
    tx.SetCenter([float(v) for v in centre + offset])
    tx.SetMatrix([1.0 / scale, 0, 0, 0, 1.0 / scale, 0, 0, 0, 1.0 / scale])
    tx.SetTranslation([float(v) for v in -offset])
    out = sitk.Resample(img, labels, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def extend_spine(labels: sitk.Image, rng: np.random.Generator,
                 subregions: sitk.Image | None = None, truncated: set[int] | frozenset = (),
                 probability: float = 0.7, abnormal: set[int] | frozenset = ()) -> Extension:
    """Add, with ``probability`` at each end, the next level beyond a complete end vertebra
    (not in ``truncated``) of ``labels``; ``subregions`` is extended alike. An end vertebra in
    ``abnormal`` (a real fracture, a lesion) is not copied: the copy would be a fracture that
    nobody reports."""
    labels = as_label_image(labels)
    cents = label_centroids(labels)
    order = level_sorted(cents)
    out = sitk.GetArrayFromImage(labels)
    sub = None if subregions is None else sitk.GetArrayFromImage(as_label_image(subregions))
    added = []
    if len(order) >= 2:
        for end, inner, step in ((order[0], order[1], -1), (order[-1], order[-2], 1)):
            new = next_level(end, step)
            if (new is None or end in truncated or end in abnormal or new in cents
                    or rng.random() >= probability or (step == 1 and end in NO_EXTENSION_BELOW)):
                continue
            offset = (cents[end] - cents[inner]) * rng.uniform(0.95, 1.05)
            scale = rng.uniform(0.94, 1.0) if step == -1 else rng.uniform(1.0, 1.06)
            moved = _copy(labels, end, offset, scale, cents[end], new)
            free = (out == 0) & (moved > 0)
            out[free] = moved[free]
            if sub is not None:
                moved_sub = _copy(labels, end, offset, scale, cents[end], new, subregions)
                sub[free] = moved_sub[free]
            if free.any():
                added.append(new)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(labels)
    sub_img = None
    if sub is not None:
        sub_img = sitk.GetImageFromArray(sub)
        sub_img.CopyInformation(labels)
    return Extension(img, sub_img, tuple(added))
