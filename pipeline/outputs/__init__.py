"""DICOM results of one analysis: SEG, SR and key image (DESIGN.md "Outputs", contract).

``build_outputs(series, result, version=1, algorithm=AlgorithmInfo())`` is the one entry point
(docs/internal-interfaces.md); each object lives in its own module:

- :mod:`pipeline.outputs.seg`: Segmentation, one segment per vertebra;
- :mod:`pipeline.outputs.sr`: Comprehensive 3D SR, TID 1500 with one TID 1411 group per vertebra;
- :mod:`pipeline.outputs.key_image`: Secondary Capture of the mid-sagittal plane.

Pure computation: imports neither ``storage`` nor ``dicom_node``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom import Dataset

from pipeline.findings import VertebraFinding
from pipeline.levels import level
from pipeline.outputs.common import AlgorithmInfo, OutputIdentity, output_identity, tracking_uid
from pipeline.outputs.enums import ResultKind

if TYPE_CHECKING:
    from pipeline.outputs.study_context import StudyContext
    from pipeline.run import AnalysisResult
    from pipeline.series_loader import LoadedSeries

__all__ = ["AlgorithmInfo", "OutputIdentity", "ResultKind", "ResultObjects", "build_outputs",
           "output_identity"]


@dataclass
class ResultObjects:
    """The three DICOM results of one version of one analysis."""

    #: None when no vertebra has voxels (a SEG needs at least one segment).
    seg: Dataset | None
    sr: Dataset
    key_image: Dataset
    version: int = 1

    def items(self) -> Iterator[tuple[ResultKind, Dataset]]:
        """(kind, dataset) in delivery order: the SEG before the SR that references it."""
        if self.seg is not None:
            yield ResultKind.SEG, self.seg
        yield ResultKind.SR, self.sr
        yield ResultKind.KEY_IMAGE, self.key_image


def _reported(findings: list[VertebraFinding]) -> list[VertebraFinding]:
    """Findings in cranio-caudal order, one per level (a level reported twice is a bug upstream)."""
    seen: set[int] = set()
    for f in findings:
        if f.label in seen:
            raise ValueError(f"vertebra {f.name} (label {f.label}) is reported twice")
        seen.add(f.label)
    return sorted(findings, key=lambda f: level(f.label).order)


#: Slices of the label map counted at a time by :func:`_present_labels`.
PRESENT_SLAB = 16


def _present_labels(label_map) -> set[int]:
    """Labels with at least one voxel (bincount: linear time, no sort of the whole volume),
    counted on slabs of :data:`PRESENT_SLAB` slices: bincount takes its input as 64-bit
    integers, eight times a uint8 label map, which for a whole series is gigabytes."""
    import numpy as np
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(label_map)
    if arr.dtype.kind not in "ui" or (arr.dtype.kind == "i" and arr.min() < 0):
        return {int(v) for v in np.unique(arr) if v > 0}
    present: set[int] = set()
    for z in range(0, arr.shape[0], PRESENT_SLAB):
        counts = np.bincount(arr[z:z + PRESENT_SLAB].ravel())
        present.update(int(v) for v in np.flatnonzero(counts) if v > 0)
    return present


def build_outputs(
    series: "LoadedSeries",
    result: "AnalysisResult",
    version: int = 1,
    algorithm: AlgorithmInfo | None = None,
    context: "StudyContext | None" = None,
) -> ResultObjects:
    """SEG, SR and key image of ``result`` (an analysis of ``series``), as version ``version``.

    Each object is in its own new series of the source study ("spine-node vN ..."); see
    :func:`pipeline.outputs.common.output_identity` for how the UIDs are made.
    When no vertebra was found there is no SEG (it needs a segment); the SR (one "no vertebra
    found" group) and the key image (no overlay) still say that the series was analysed. The
    result's ``numbering`` (where it has one) goes into the SR and onto the key image;
    ``context`` (:mod:`pipeline.outputs.study_context`: the part of a multi-part study, the
    result it replaces) into the SR.
    Raises ``ValueError`` when the label map is not on the source grid.
    """
    from pipeline.outputs.key_image import build_key_image_and_plane
    from pipeline.outputs.seg import build_seg, plan_segments
    from pipeline.outputs.sr import build_sr

    algorithm = algorithm or AlgorithmInfo()
    headers = list(series.headers)
    if not headers:
        raise ValueError("the series has no instances")
    source_uid = str(series.series_instance_uid)
    findings = _reported(list(result.vertebrae))
    salt = algorithm.uid_salt
    tracks = {f.name: tracking_uid(source_uid, version, f.name, salt) for f in findings}
    present = _present_labels(result.label_map)
    segments = plan_segments(findings, present, tracks)
    unsegmented = [(f, tracks[f.name]) for f in findings if f.label not in present]

    seg = build_seg(headers, result.label_map, segments,
                    output_identity(source_uid, version, ResultKind.SEG, salt),
                    algorithm) if segments else None
    numbering = getattr(result, "numbering", None)
    # The key image first: the SR's heights are lines on it (pipeline.outputs.sr_key_image).
    key, plane = build_key_image_and_plane(
        series.image, result.label_map, findings, headers[0],
        output_identity(source_uid, version, ResultKind.KEY_IMAGE, salt), algorithm,
        numbering=numbering)
    sr = build_sr(headers, seg, segments, unsegmented,
                  output_identity(source_uid, version, ResultKind.SR, salt), algorithm,
                  numbering=numbering, context=context, key_image=(key, plane))
    return ResultObjects(seg=seg, sr=sr, key_image=key, version=version)
