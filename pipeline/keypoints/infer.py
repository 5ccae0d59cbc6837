"""Keypoint inference: plane -> 2D M-SCN -> six points in LPS mm (paper eq. 15-16).

The paper decodes each heatmap by its argmax (eq. 16). A heatmap of an endplate point can also
light up on the neighbouring vertebra's endplate, one disc away, or on a blurred endplate of a
thick-slice scan, and when that second peak wins, one blundered point turns a normal vertebra
into a grade 3 "fracture". :func:`decode_keypoints` therefore takes, among the strong local
maxima of every channel, the combination that is both strong and shaped like a vertebral body:

- of each pair, the superior point (A1, M1, P1) lies above the inferior one (A2, M2, P2), and the
  columns run anterior (A) -> middle (M) -> posterior (P);
- the endplates are flat or concave: M1 lies no higher than the chord A1-P1 and M2 no lower than
  the chord A2-P2, beyond :data:`CONCAVITY_TOLERANCE_MM` (a biconcave fracture moves M further
  inside, which is allowed; only an M point outside its body is penalised).

A heatmap with one clear peak per channel decodes exactly as the argmax; the shape only chooses
between peaks the network itself finds comparable (at least :data:`MIN_PEAK_FRACTION` of the
channel's maximum). :func:`locate_keypoints` decodes the mean heatmaps of three parallel planes
(:data:`PARASAGITTAL_OFFSETS_MM`): the endplates run on from plane to plane, a spurious peak
of one plane does not.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.plane import SagittalPlane, body_centre, plane_axes, sagittal_plane
from pipeline.segmentation.crops import normalise

#: Local maxima weaker than this fraction of their channel's maximum are no candidates.
MIN_PEAK_FRACTION = 0.3
#: Candidates per channel (at most; most channels have one).
MAX_CANDIDATES = 4
#: How far an M point may lie outside the chord of its endplate before it is penalised (mm).
CONCAVITY_TOLERANCE_MM = 1.0
#: Score lost per mm of such a violation (a candidate's score is its value / the channel maximum).
CONCAVITY_PENALTY_PER_MM = 0.5
#: How far the vertebral body's centre lies in front of the vertebra's centroid (mm): the mean of
#: the six true keypoints is 9-18 mm anterior of the centroid from C3 to L5 on phantoms 8001-8003
#: and 8102 (the posterior elements pull the centroid back).
BODY_OFFSET_MM = 12.0
#: A body centre found on the segmentation is believed when it lies this far in front of the
#: centroid (mm) and no further than ``MAX_BODY_AXIAL_MM`` above or below it.
BODY_OFFSET_RANGE_MM = (3.0, 30.0)
MAX_BODY_AXIAL_MM = 6.0
#: The second pass re-centres on the first pass's points when they lie within this of its centre.
MAX_RECENTRE_MM = 20.0
#: Offsets (mm, along the plane's normal) of the planes whose heatmaps the second pass averages:
#: from the true centroids on the 3 mm whole spines 8102-8106, one plane gave 2 false fractures
#: (specificity 0.981, kappa 0.829), three planes none (1.0, 1.0); 9001-9010 graded the same;
#: keypoints 0.55 -> 1.02 s on the 22 vertebrae of the bench series (docs/archive/model-card-history.md).
PARASAGITTAL_OFFSETS_MM = (-1.5, 0.0, 1.5)


def plane_input(ct: sitk.Image, fg: sitk.Image | None, plane: SagittalPlane) -> np.ndarray:
    """The network input on ``plane``: ``[2, row, col]`` = (z-scored CT, foreground probability)."""
    hu = plane.sample(ct, True, -1024.0)
    mask = plane.sample(fg, True, 0.0) if fg is not None else np.zeros_like(hu)
    return np.stack([normalise(hu), mask.astype(np.float32)])


def decode_heatmaps(heatmaps: np.ndarray) -> np.ndarray:
    """Sub-pixel ``(row, col)`` of each channel: argmax (eq. 16), refined by a parabola through the
    logarithms around the peak (exact for the Gaussian targets; the localization decoder's
    :func:`pipeline.localization.heatmaps.channel_peaks`)."""
    from pipeline.localization.heatmaps import channel_peaks

    positions, _ = channel_peaks(np.asarray(heatmaps))
    return positions


def _candidates(heatmap: np.ndarray) -> list[tuple[float, tuple[int, int]]]:
    """Local maxima of one channel, strongest first: ``(value / channel maximum, (row, col))``."""
    from scipy import ndimage

    arg = tuple(int(i) for i in np.unravel_index(int(heatmap.argmax()), heatmap.shape))
    peak = float(heatmap[arg])
    if peak <= 0:
        return [(1.0, arg)]
    local = (heatmap == ndimage.maximum_filter(heatmap, size=5)) & (heatmap >= MIN_PEAK_FRACTION * peak)
    rr, cc = np.nonzero(local)
    order = np.argsort(-heatmap[rr, cc])[:MAX_CANDIDATES]
    out = [(float(heatmap[rr[i], cc[i]]) / peak, (int(rr[i]), int(cc[i]))) for i in order]
    return out or [(1.0, arg)]


def shape_penalty(rc: np.ndarray, spacing_mm: float) -> float:
    """How little six integer ``(row, col)`` points (A1 A2 M1 M2 P1 P2) look like a vertebral
    body (0 = plausible; ``inf`` = a superior point not above its inferior one, or the columns not
    anterior -> posterior). See the module docstring."""
    a1, a2, m1, m2, p1, p2 = (np.asarray(p, float) for p in rc)
    if a1[0] <= a2[0] or m1[0] <= m2[0] or p1[0] <= p2[0]:
        return float("inf")
    if not (max(a1[1], a2[1]) < min(m1[1], m2[1]) and max(m1[1], m2[1]) < min(p1[1], p2[1])):
        return float("inf")

    def chord_row(p: np.ndarray, q: np.ndarray, col: float) -> float:
        t = (col - p[1]) / (q[1] - p[1]) if q[1] != p[1] else 0.5
        return p[0] + t * (q[0] - p[0])

    above = (m1[0] - chord_row(a1, p1, m1[1])) * spacing_mm    # M1 above the upper chord
    below = (chord_row(a2, p2, m2[1]) - m2[0]) * spacing_mm    # M2 below the lower chord
    excess = max(0.0, above - CONCAVITY_TOLERANCE_MM) + max(0.0, below - CONCAVITY_TOLERANCE_MM)
    return CONCAVITY_PENALTY_PER_MM * excess


def decode_keypoints(heatmaps: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Sub-pixel ``(row, col)`` of the six channels (:data:`KEYPOINT_NAMES` order; rows run
    inferior -> superior, columns anterior -> posterior): the strongest plausible combination of
    each channel's peaks (module docstring), each refined like :func:`decode_heatmaps`. Falls
    back to the argmax when no combination is plausible."""
    from pipeline.localization.heatmaps import refine_peak

    hm = np.asarray(heatmaps, dtype=np.float64)
    cands = [_candidates(h) for h in hm]
    best, best_score = None, -np.inf
    for combo in itertools.product(*cands):
        score = sum(v for v, _ in combo) - shape_penalty(np.array([p for _, p in combo]), spacing_mm)
        if score > best_score:
            best, best_score = combo, score
    if best is None or not np.isfinite(best_score):
        best = [c[0] for c in cands]
    return np.stack([refine_peak(hm[k], p) for k, (_, p) in enumerate(best)])


def points_mm(heatmaps: np.ndarray, plane: SagittalPlane, shape_prior: bool = True
              ) -> dict[str, tuple[float, float, float]]:
    """The six points of one plane's heatmaps in LPS mm: :func:`decode_keypoints`, or each
    channel's argmax (the paper's eq. 16) with ``shape_prior=False``."""
    rc = decode_keypoints(heatmaps, plane.spacing_mm) if shape_prior else decode_heatmaps(heatmaps)
    return {name: plane.to_mm(rc[k]) for k, name in enumerate(KEYPOINT_NAMES)}


def first_centre(fg: sitk.Image | None, centroid_mm: Sequence[float], up: Sequence[float]
                 ) -> tuple[float, float, float]:
    """Where the first keypoint pass centres its plane: the body on the segmentation
    (:func:`pipeline.keypoints.plane.body_centre`) where it lies where a body can lie relative to
    the centroid (:data:`BODY_OFFSET_RANGE_MM`, :data:`MAX_BODY_AXIAL_MM`); else, as with a
    segmentation broken on this plane, :data:`BODY_OFFSET_MM` in front of the centroid."""
    c = np.asarray(centroid_mm, float)
    u, p = plane_axes(up)
    if fg is not None:
        bc = np.asarray(body_centre(fg, c, up), float)
        forward, axial = -float((bc - c) @ p), float((bc - c) @ u)
        if BODY_OFFSET_RANGE_MM[0] <= forward <= BODY_OFFSET_RANGE_MM[1] and abs(axial) <= MAX_BODY_AXIAL_MM:
            return tuple(float(v) for v in bc)
    return tuple(float(v) for v in c - BODY_OFFSET_MM * p)


def locate_keypoints(model: torch.nn.Module, ct: sitk.Image, fgs: Sequence[sitk.Image | None],
                     centroids_mm: Sequence[Sequence[float]], ups: Sequence[Sequence[float]],
                     size: int, spacing_mm: float, device: str | torch.device = "cpu",
                     use_mask: bool = True, shape_prior: bool = True,
                     offsets_mm: Sequence[float] = PARASAGITTAL_OFFSETS_MM
                     ) -> tuple[list[SagittalPlane], list[dict[str, tuple[float, float, float]]]]:
    """The six keypoints of every vertebra, in two passes: a plane centred by :func:`first_centre`,
    then a plane centred on the first pass's points (as the network was trained: around the true
    body, :mod:`pipeline.keypoints.dataset`). The second pass averages the heatmaps of planes
    moved by ``offsets_mm`` along the plane's normal (parasagittal planes: the endplates run on,
    a blunder of one plane does not) before decoding. Returns the final planes and the points
    (LPS mm)."""
    from pipeline.host_threads import host_map

    def run(centres, offsets):
        planes = [sagittal_plane(c, up, size, spacing_mm) for c, up in zip(centres, ups)]
        heatmaps = None
        for o in offsets:
            # o bound as a default (host_map is done with it before the loop moves on)
            inputs = host_map(lambda fp, o=o: plane_input(ct, fp[0], fp[1].shifted(o)), list(zip(fgs, planes)),
                              device)
            if not use_mask:
                for x in inputs:
                    x[1] = 0.0  # a keypoint model trained on the CT alone
            h = predict_heatmaps_2d(model, np.stack(inputs), device)
            heatmaps = h if heatmaps is None else heatmaps + h
        heatmaps /= len(offsets)
        return planes, [points_mm(h, pl, shape_prior) for h, pl in zip(heatmaps, planes)]

    if not fgs:
        return [], []
    first = [first_centre(fg, c, up) for fg, c, up in zip(fgs, centroids_mm, ups)]
    _, kps = run(first, (0.0,))
    second = []
    for c0, kp in zip(first, kps):
        m = np.mean([np.asarray(kp[n], float) for n in KEYPOINT_NAMES], axis=0)
        second.append(tuple(float(v) for v in m) if np.linalg.norm(m - np.asarray(c0)) <= MAX_RECENTRE_MM
                      else c0)
    return run(second, tuple(offsets_mm) or (0.0,))


def predict_heatmaps_2d(model: torch.nn.Module, inputs: np.ndarray, device: str | torch.device = "cpu",
                        batch: int = 16) -> np.ndarray:
    """The network's six heatmaps ``[n, 6, row, col]`` for inputs ``[n, 2, row, col]``."""
    from pipeline.nets.batched import forward_batched

    return forward_batched(model, inputs, device, batch, empty_shape=(0, 6) + tuple(inputs.shape[-2:]),
                           fixed_shape=torch.device(device).type == "cuda")


def predict_keypoints(model: torch.nn.Module, inputs: np.ndarray, planes: Sequence[SagittalPlane],
                      device: str | torch.device = "cpu", batch: int = 16, shape_prior: bool = True
                      ) -> list[dict[str, tuple[float, float, float]]]:
    """Keypoints in LPS mm for each input ``[2, row, col]`` on its plane: decoded by
    :func:`decode_keypoints`, or by each channel's argmax (the paper's eq. 16) with
    ``shape_prior=False``."""
    heatmaps = predict_heatmaps_2d(model, inputs, device, batch)
    return [points_mm(h, plane, shape_prior) for h, plane in zip(heatmaps, planes)]
