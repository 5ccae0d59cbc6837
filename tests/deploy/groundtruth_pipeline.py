"""A stand-in for ``pipeline.run.analyse`` that answers with a phantom's ground truth.

For tests (and the README's pictures) that exercise everything around the models — routing,
storage, jobs, the real SEG/SR/key-image builders, delivery — without trained weights and
without spending the shared CPUs on inference. ``pipeline.entry_point =
"tests.deploy.groundtruth_pipeline:analyse"`` with the environment variable
``GROUND_TRUTH_PHANTOM_DIR`` naming the folder ``spine-node phantom --out`` wrote.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import SimpleITK as sitk

from pipeline.findings import GenantGrade, Heights, Morphology, VertebraFinding
from pipeline.run import AnalysisResult

ENV = "GROUND_TRUTH_PHANTOM_DIR"


def from_ground_truth(series, gt: dict, labels: sitk.Image) -> AnalysisResult:
    """The analysis a perfect model would return: ``gt`` (gt.json) and ``labels`` (the label
    map, resampled onto the series' grid)."""
    label_map = sitk.Resample(labels, series.image, sitk.Transform(), sitk.sitkNearestNeighbor,
                              0, sitk.sitkUInt8)
    findings = []
    for v in gt["vertebrae"]:
        h = v["heights_mm"]
        findings.append(VertebraFinding(
            label=v["label"], name=v["name"], centroid_mm=tuple(v["centroid_mm"]),
            fractured=v["fractured"], genant_grade=GenantGrade(v["genant_grade"]),
            morphology=Morphology(v["morphology"]),
            heights_mm=Heights(h["anterior"], h["middle"], h["posterior"]),
            height_loss=v.get("height_loss"), partial=v["partial"],
            keypoints_mm={k: tuple(p) for k, p in v["keypoints_mm"].items()}
            if v.get("keypoints_mm") else None))
    return AnalysisResult(series.study_instance_uid, series.series_instance_uid, findings,
                          label_map, timings_s={"ground_truth": 0.0})


def analyse(series, device: str = "auto") -> AnalysisResult:
    folder = Path(os.environ[ENV])
    gt = json.loads((folder / "gt.json").read_text())
    if gt["series_instance_uid"] != series.series_instance_uid:
        raise ValueError(f"{folder} holds the ground truth of another series")
    return from_ground_truth(series, gt, sitk.ReadImage(str(folder / "labels.nii.gz")))
