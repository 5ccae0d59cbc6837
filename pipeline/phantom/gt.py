"""Ground truth of a phantom: the Genant rule used to grade it, centroids from the label map, gt.json.

Genant (DESIGN.md "Pipeline" step 4, paper section 2.3.3): HA = |A1A2|, HM = |M1M2|,
HP = |P1P2|; height loss = 1 - min/max within the vertebra; for a crush fracture the whole body
is reduced, which the within-vertebra ratio cannot see, so the largest height is also compared
with the reference height of the neighbouring normal vertebrae (``reference_height_mm`` in
gt.json: the mean of the largest heights of the nearest normal vertebra above and below, within
the same region: cervical, thoracic or lumbar). The reported loss is the larger of the two.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.findings import GenantGrade, Morphology
from pipeline.levels import BY_LABEL

GT_DECIMALS = 4


def genant_from_heights(heights: dict[str, float], reference: float | None) -> tuple[float, GenantGrade, Morphology]:
    """(height loss, grade, morphology) of one vertebra from its three heights (mm).

    ``reference``: mean of the largest heights of the nearest normal vertebra above and below in
    the same region (``None`` when there is none); it only matters for crush fractures.
    """
    ha, hm, hp = heights["anterior"], heights["middle"], heights["posterior"]
    hmax = max(ha, hm, hp)
    hmin = min(ha, hm, hp)
    loss_shape = 1.0 - hmin / hmax if hmax > 0 else 0.0
    loss_ref = 1.0 - hmax / reference if reference else 0.0
    loss = max(loss_shape, loss_ref, 0.0)
    grade = GenantGrade.from_height_loss(loss)
    if grade == GenantGrade.NORMAL:
        return loss, grade, Morphology.NORMAL
    if loss_ref > loss_shape:
        return loss, grade, Morphology.CRUSH
    if hmin == ha:
        return loss, grade, Morphology.WEDGE
    if hmin == hm:
        return loss, grade, Morphology.BICONCAVE
    return loss, grade, Morphology.CRUSH


def reference_height(order: list[int], heights: dict[int, dict[str, float]], fractured: set[int],
                     label: int) -> float | None:
    """Mean of the largest heights of the nearest non-fractured vertebra above and below ``label``.

    ``order``: labels in cranio-caudal order (only those that may serve as neighbours).
    """
    if label not in order or BY_LABEL[label].name in ("C1", "C2"):
        return None  # no body comparable with its neighbours'
    k = order.index(label)
    region = BY_LABEL[label].region
    refs = []
    for step in (-1, 1):
        j = k + step
        # only within the same region: a C7 is not compared with a T1, nor an L1 with a T12
        while 0 <= j < len(order) and BY_LABEL[order[j]].region == region:
            lab = order[j]
            if lab not in fractured and lab in heights and BY_LABEL[lab].name not in ("C1", "C2"):
                refs.append(max(heights[lab].values()))
                break
            j += step
    return float(np.mean(refs)) if refs else None


def label_centroids(lab: np.ndarray, boxes: dict[int, tuple], index_to_world) -> dict[int, dict[str, Any]]:
    """Centroid (LPS mm) and edge contact of every label, from its voxels in the label map.

    ``boxes``: label -> (k, j, i) slices known to contain all voxels of that label.
    """
    out = {}
    shape = lab.shape
    for label, box in boxes.items():
        m = lab[box] == label
        n = int(m.sum())
        if n == 0:
            continue
        c = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            prof = m.sum(axis=other, dtype=np.int64)
            idx = np.arange(box[axis].start, box[axis].stop, dtype=np.float64)
            c.append(float((prof * idx).sum()) / n)
        touches = False
        for axis in range(3):
            if box[axis].start == 0 and np.take(m, 0, axis=axis).any():
                touches = True
            if box[axis].stop == shape[axis] and np.take(m, -1, axis=axis).any():
                touches = True
        world = index_to_world(np.array([c]))[0]
        out[label] = {"centroid_mm": [float(v) for v in world], "voxels": n, "touches_edge": touches}
    return out


def rounded(v, nd: int = GT_DECIMALS):
    return [round(float(a), nd) for a in v]
