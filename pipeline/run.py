"""The pipeline's one entry point: a loaded series in, findings and a label map out.

``analyse`` runs the paper's steps (DESIGN.md "Pipeline"): localization (M-SCN) -> the
anatomical anchors of the level names (ribs, sacrum, skull base: :mod:`pipeline.anchors`, which
rename the chain where they contradict the localizer, or mark the numbering uncertain) ->
per-vertebra segmentation (3D U-Net, :mod:`pipeline.segmentation`) -> Genant keypoints on the
mid-sagittal plane (2D M-SCN, :mod:`pipeline.keypoints`) -> grading (:mod:`pipeline.genant`).
``process``, the ``serve`` worker and ``evaluate`` all call it, so they report the same thing.

The fractured flag of a vertebra is its Genant grade (>= 1: a height loss of 20 % or more, the
definition of a vertebral fracture in DESIGN.md); the segmentation network's own
normal/fractured vote is kept as a note where it disagrees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.findings import GenantGrade, Morphology, VertebraFinding
from pipeline.levels import BY_LABEL
from pipeline.numbering import Numbering


@dataclass
class AnalysisResult:
    """What ``analyse`` found in one series (docs/internal-interfaces.md).

    ``numbering`` says whether the level names rest on anatomical anchors (ribs, sacrum, skull
    base: :mod:`pipeline.anchors`, :mod:`pipeline.numbering`) or are uncertain, and why.
    """

    study_instance_uid: str
    series_instance_uid: str
    vertebrae: list[VertebraFinding]
    label_map: sitk.Image
    timings_s: dict[str, float] = field(default_factory=dict)
    numbering: Numbering | None = None

    def summary(self) -> dict[str, Any]:
        """summary.json (DESIGN.md, contract), plus ``numbering`` (:meth:`Numbering.as_dict`)."""
        out: dict[str, Any] = {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "vertebrae": [v.summary() for v in self.vertebrae],
        }
        if self.numbering is not None:
            out["numbering"] = self.numbering.as_dict()
        out["timings_s"] = {k: round(float(v), 3) for k, v in self.timings_s.items()}
        return out


def _localize(image: sitk.Image, device: str, model=None):
    from pipeline.localization.infer import localize

    return localize(image, device, model=model)


def analyse(series, device: str = "auto", models: dict[str, Any] | None = None,
            centroids: list | None = None) -> AnalysisResult:
    """Run the whole pipeline on ``series`` (a :class:`pipeline.series_loader.LoadedSeries`).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda``.
        models: optional preloaded models by name (``localization``, ``junction``,
            ``segmentation``, ``keypoints``); the others come from :func:`pipeline.registry.load_model`.
        centroids: skip localization and use these (objects with ``label``, ``centroid_mm`` and
            optionally ``partial``), e.g. ground truth for evaluating later steps alone.
    """
    import torch

    from pipeline.genant import grade_spine, heights_from_keypoints, heights_from_mask, note_measurement_uncertainty
    from pipeline.keypoints.infer import locate_keypoints
    from pipeline.keypoints.plane import spine_axes
    from pipeline.registry import load_model, resolve_device
    from pipeline.segmentation.crops import array_image
    from pipeline.segmentation.infer import crop_geometry, segment

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    models = dict(models or {})
    dev = resolve_device(device)
    image = series.image  # int16 or float32 HU; every stage resamples what it needs to float32

    t = time.perf_counter()
    for name in ("segmentation", "keypoints") + (() if centroids is not None
                                                 else ("localization", "junction")):
        if name not in models:
            models[name] = load_model(name, str(dev))
    timings["load_models"] = time.perf_counter() - t

    t = time.perf_counter()
    if centroids is None:
        with torch.inference_mode():
            found = _localize(image, str(dev), models["localization"])
    else:
        found = list(centroids)
    found, numbering = _anchor_levels(image, found, renumber=centroids is None,
                                      junction_model=models.get("junction"))
    timings["localization"] = time.perf_counter() - t

    t = time.perf_counter()
    size, spacing_mm = crop_geometry(getattr(models["segmentation"], "meta", {}))
    seg = segment(image, [(int(v.label), tuple(v.centroid_mm)) for v in found], models["segmentation"],
                  dev, size=size, spacing_mm=spacing_mm)
    timings["segmentation"] = time.perf_counter() - t

    t = time.perf_counter()
    orders = [BY_LABEL[int(v.label)].order for v in found]
    ups = spine_axes(orders, [v.centroid_mm for v in found])
    kp_meta = getattr(models["keypoints"], "meta", {})
    size = int(kp_meta.get("plane_size", 96))
    spacing = float(kp_meta.get("plane_spacing_mm", 0.75))
    fgs = [array_image(sv.foreground, sv.crop) for sv in seg.vertebrae]
    planes, keypoints = locate_keypoints(models["keypoints"], image, fgs, [sv.centroid_mm for sv in seg.vertebrae],
                                         ups, size, spacing, dev, use_mask=kp_meta.get("use_mask", True))
    # Heights on the mask, on the same planes: from the finest foreground the segmentation has
    # (1 mm if refined).
    mask_heights = [heights_from_mask(plane.sample(sv.fine if sv.fine is not None else fg, True, 0.0), spacing)
                    for sv, fg, plane in zip(seg.vertebrae, fgs, planes)]
    timings["keypoints"] = time.perf_counter() - t

    t = time.perf_counter()
    z_lo, z_hi = _z_extent(image)
    findings = []
    for v, sv, kp, mh in zip(found, seg.vertebrae, keypoints, mask_heights):
        lv = BY_LABEL[int(v.label)]
        f = VertebraFinding(label=lv.label, name=lv.name,
                            centroid_mm=tuple(float(c) for c in v.centroid_mm),
                            keypoints_mm=kp, heights_mm=heights_from_keypoints(kp), mask_heights_mm=mh)
        f.partial = bool(getattr(v, "partial", False)) or _cut_by_fov(sv, z_lo, z_hi)
        if getattr(v, "found_by", "localizer") == "junction":
            f.notes.append(f"missed by the localizer; placed one chain step below the vertebra "
                           f"above by the junction classifier (probability {v.score:.2f} that "
                           f"it is the last mobile vertebra above the sacrum)")
        if sv.voxels == 0:
            f.notes.append("the segmentation found no voxels of this vertebra")
        findings.append((f, sv))
    grade_spine([f for f, _ in findings], orders)
    slice_mm = _slice_spacing_mm(image)
    for f, sv in findings:
        if f.partial:
            # A vertebra cut by the field of view has no measurable heights: never graded.
            f.notes.append("cut by the field of view: heights not measurable, not graded")
            f.genant_grade, f.morphology, f.height_loss = GenantGrade.NORMAL, Morphology.NORMAL, None
        f.fractured = f.genant_grade >= GenantGrade.MILD
        note_measurement_uncertainty(f, slice_mm)
        seg_says = sv.fracture_score > 0.5
        if not f.partial and f.grading_source != "none" and seg_says != f.fractured:
            f.notes.append(f"the segmentation network calls it {'fractured' if seg_says else 'normal'} "
                           f"(score {sv.fracture_score:.2f}); the Genant grade decided")
    timings["genant"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return AnalysisResult(study_instance_uid=series.study_instance_uid,
                          series_instance_uid=series.series_instance_uid,
                          vertebrae=[f for f, _ in findings], label_map=seg.label_map,
                          timings_s=timings, numbering=numbering)


#: The junction classifier is asked only where the localizer named the lowest vertebra this
#: level or lower: a chain named higher ends far above the sacrum even where its names are a
#: few levels off.
JUNCTION_FROM = "T10"


def _anchor_levels(image: sitk.Image, found: list, renumber: bool,
                   junction_model=None) -> tuple[list, Numbering]:
    """The found vertebrae in anatomical order and the numbering of their levels.

    The anchors (:func:`pipeline.anchors.find_numbering`) are measured right after
    localization; where they fix the levels and contradict the localizer, the whole chain is
    renamed consistently (``renumber``). With ``junction_model`` the lumbosacral junction
    classifier (:mod:`pipeline.junction`) is asked first, where the localizer named the lowest
    vertebra :data:`JUNCTION_FROM` or lower: a vertebra it finds missed right above the sacrum
    joins the chain, and it fixes L5 where the sacrum test cannot see. Labels
    the caller supplied are kept; where the anchors name them otherwise the numbering says so
    and is uncertain.
    """
    from dataclasses import replace

    from pipeline.anchors import find_numbering
    from pipeline.numbering import TYPICAL_STEP_MM, apply_numbering, position

    found = sorted(found, key=lambda v: BY_LABEL[int(v.label)].order)
    junction = None
    if renumber and junction_model is not None and found and \
            position(BY_LABEL[int(found[-1].label)].name) >= position(JUNCTION_FROM):
        from pipeline.junction.chain import with_missed_last
        from pipeline.junction.infer import find_junction

        junction = find_junction(image, [v.centroid_mm for v in found], TYPICAL_STEP_MM["L"],
                                 junction_model)
        completed = with_missed_last(found, junction)
        if junction.state == "below" and len(completed) == len(found):
            junction = None                  # a chain with variant names: nothing added
        found = completed
    numbering = find_numbering(image, found, junction)
    if renumber:
        return apply_numbering(found, numbering)
    names = [BY_LABEL[int(v.label)].name for v in found]
    if not numbering.uncertain and list(numbering.names) != names:
        numbering = replace(
            numbering, status="uncertain",
            reason=(f"the labels supplied by the caller ({names[0]}-{names[-1]}) were kept; "
                    f"the anatomical anchors name these vertebrae {numbering.names[0]}-"
                    f"{numbering.names[-1]} ({numbering.reason})"))
    return found, numbering


def _slice_spacing_mm(image: sitk.Image) -> float:
    """The coarsest voxel spacing of the series (its slice spacing for an axial series): what
    limits how precisely an endplate can be placed along the spine."""
    return float(max(image.GetSpacing()))


def _z_extent(image: sitk.Image) -> tuple[float, float]:
    """Lowest and highest patient z of the volume's voxel centres."""
    size = image.GetSize()
    zs = [image.TransformIndexToPhysicalPoint((i, j, k))[2]
          for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return min(zs), max(zs)


def _cut_by_fov(sv, z_lo: float, z_hi: float) -> bool:
    """The vertebra's crop foreground reaches the first or last slice of the volume: the
    vertebra continues beyond the field of view.

    Only an end of the volume that lies within the crop counts: foreground that reaches the
    crop's own border inside the volume (a segmentation leaking into a neighbour) is no cut.
    """
    fg = sv.foreground
    if fg.max() <= 0.5:
        return False
    ref = sv.crop
    spacing = ref.GetSpacing()[2]
    z0 = ref.GetOrigin()[2]
    zs = z0 + np.arange(fg.shape[0]) * spacing
    inside = (zs >= z_lo - 1e-3) & (zs <= z_hi + 1e-3)
    rows = (fg > 0.5).reshape(fg.shape[0], -1).sum(axis=1)
    if rows.max() == 0:
        return False
    idx = np.nonzero(rows)[0]
    top, bottom = idx.max(), idx.min()
    inside_idx = np.nonzero(inside)[0]
    if len(inside_idx) == 0:
        return True
    # the volume's lowest (highest) slice lies within the crop, and the foreground reaches it
    cut_below = zs[0] <= z_lo + spacing / 2 and bottom <= inside_idx.min()
    cut_above = zs[-1] >= z_hi - spacing / 2 and top >= inside_idx.max()
    return bool(cut_below or cut_above)
