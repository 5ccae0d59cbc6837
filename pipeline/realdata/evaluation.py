"""``spine-node evaluate --data DIR``: real cases through the pipeline, metrics per case and pooled.

The report carries the same contract keys as the phantom evaluation (DESIGN.md, "Command line":
``id_rate``, ``localization_error_mm``, ``dice``, ``assd_mm``, ``mssd_mm``, ``precision``,
``recall``, ``fracture_sensitivity``, ``fracture_specificity``, ``genant_exact``,
``genant_weighted_kappa``), computed by the same functions (:mod:`pipeline.evaluate`), once per
case (``cases``) and pooled (the top level: means over cases, grading pooled over vertebrae).

Each case is turned into what a DICOM series gives the pipeline: the CT reoriented to the axial
LPS layout of an axial acquisition (a lossless permutation of its axes), in HU. The truth is the
case's mask on the same grid:

- a vertebra is *partial* (neither required nor a false positive, not graded) when its mask
  reaches the first or last slice along the patient's cranio-caudal axis (cut by the field of
  view), or is a sliver (:mod:`pipeline.realdata.truth`);
- only levels with an expert grade count for grading; the others count for localization and
  segmentation alone. A mask that a model made (``annotation: "model"``) is reported, but the
  pooled ``expert`` block leaves such cases out.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from pipeline.evaluate import (
    REPORT_KEYS,
    grading_pairs,
    localization_case,
    localization_report,
    segmentation_case,
    segmentation_grading_report,
)
from pipeline.findings import GenantGrade
from pipeline.realdata.pack import RealCase
from pipeline.realdata.truth import axial_lps, truth_vertebrae


@dataclass
class _Series:
    """A real case as :func:`pipeline.run.analyse` expects a loaded series."""

    image: sitk.Image
    study_instance_uid: str
    series_instance_uid: str


@dataclass
class _Centroid:
    label: int
    centroid_mm: tuple[float, float, float]
    partial: bool = False


def _rounded_heights(heights: Any) -> list[float] | None:
    """Anterior, middle and posterior height in mm to 0.1 mm, or None without heights."""
    if heights is None:
        return None
    return [round(float(h), 1) for h in (heights.anterior, heights.middle, heights.posterior)]


def evaluate_case(case: RealCase, device: str = "auto", models: dict[str, Any] | None = None,
                  gt_centroids: bool = False) -> dict[str, Any]:
    """One case through :func:`pipeline.run.analyse`; its metrics and its per-level details.

    ``gt_centroids``: start from the true centroids (evaluates segmentation and grading alone).
    """
    from pipeline.run import analyse

    image = axial_lps(case.ct)
    mask = axial_lps(case.mask)
    truth = truth_vertebrae(case, mask)
    cents = None
    if gt_centroids:
        cents = [_Centroid(v["label"], tuple(v["centroid_mm"]), v["partial"]) for v in truth]
    t0 = time.perf_counter()
    result = analyse(_Series(image, case.case_id, case.case_id), device=device, models=models,
                     centroids=cents)
    runtime = time.perf_counter() - t0
    loc = localization_case(truth, result.vertebrae)
    loc.runtime_s = round(runtime, 3)
    seg = segmentation_case(sitk.GetArrayViewFromImage(result.label_map),
                            sitk.GetArrayViewFromImage(mask), image.GetSpacing()[::-1], truth)
    graded = [dict(v, genant_grade=int(v["genant_grade"])) for v in truth
              if v["genant_grade"] is not None]
    pairs = grading_pairs(graded, result.vertebrae)
    return {"loc": loc, "seg": seg, "pairs": pairs, "truth": truth,
            "predicted": [{"name": f.name, "label": f.label,
                           "centroid_mm": [round(float(c), 1) for c in f.centroid_mm],
                           "genant_grade": int(f.genant_grade), "partial": f.partial,
                           "morphology": f.morphology.value,
                           "grading_source": getattr(f, "grading_source", None),
                           "heights_mm": _rounded_heights(f.heights_mm),
                           "mask_heights_mm": _rounded_heights(getattr(f, "mask_heights_mm", None))}
                          for f in result.vertebrae],
            "numbering": getattr(result, "numbering", None), "runtime_s": runtime}


def _block(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Contract keys (and the extras of the phantom report) over some cases."""
    report = localization_report([r["loc"] for r in results])
    report["detection_precision"] = report["precision"]
    report["detection_recall"] = report["recall"]
    report.update(segmentation_grading_report([r["seg"] for r in results],
                                              [r["pairs"] for r in results]))
    graded = [p for r in results for p in r["pairs"]]
    graded_normal = [p for p in graded if p["gt_grade"] == 0]
    severe = [p for p in graded if p["gt_grade"] >= 2]
    # Called normal: found, assessed and graded 0; a vertebra missed or reported as not assessed
    # was not called normal (nor fractured).
    report["grade0_called_normal"] = (sum(p["found"] and p["assessed"]
                                          and p["grade"] == GenantGrade.NORMAL
                                          for p in graded_normal)
                                      / len(graded_normal) if graded_normal else None)
    report["graded_vertebrae_assessed"] = (sum(p["found"] and p["assessed"] for p in graded)
                                           / len(graded) if graded else None)
    report["grade2plus_called_fractured"] = (sum(p["fractured"] for p in severe) / len(severe)
                                             if severe else None)
    report["vertebrae_reported_where_none"] = sum(len(r["loc"].false_positives) for r in results)
    return report


def evaluate_cases(cases: Iterable[RealCase], device: str = "auto",
                   json_path: Path | None = None, models: dict[str, Any] | None = None,
                   log: Callable[[str], None] = lambda s: None,
                   split_name: str | None = None, gt_centroids: bool = False) -> dict[str, Any]:
    """Every case through the pipeline: the pooled report (contract keys at the top level), an
    ``expert`` block without model-made masks, and one block per case."""
    results, per_case = [], []
    for case in cases:
        r = evaluate_case(case, device, models, gt_centroids)
        results.append(r)
        block = _block([r])
        dices = [v["dice"] for v in r["seg"].values()]
        log(f"{case.case_id}: {r['loc'].identified}/{r['loc'].n_required} identified, "
            f"dice {np.mean(dices) if dices else float('nan'):.3f}, predicted "
            f"{[v['name'] for v in r['predicted']]}, {r['runtime_s']:.1f} s")
        per_case.append({"case_id": case.case_id, "subject": case.subject,
                         "annotation": case.annotation,
                         **{k: block.get(k) for k in REPORT_KEYS},
                         "grade0_called_normal": block["grade0_called_normal"],
                         "graded_vertebrae_assessed": block["graded_vertebrae_assessed"],
                         "grade2plus_called_fractured": block["grade2plus_called_fractured"],
                         "false_positive_vertebrae": r["loc"].false_positives,
                         "missed": r["loc"].missed,
                         "dice_per_vertebra": {k: round(v["dice"], 4) for k, v in r["seg"].items()},
                         "truth": [{k: v[k] for k in ("name", "partial", "genant_grade")}
                                   for v in r["truth"]],
                         "predicted": r["predicted"], "numbering": r["numbering"],
                         "runtime_s": round(r["runtime_s"], 2)})
        case.ct = case.mask = None  # type: ignore[assignment]  # free the volumes early
    if not results:
        raise ValueError("no case to evaluate")
    report = _block(results)
    expert = [r for r, c in zip(results, per_case) if c["annotation"] == "expert"]
    report["expert"] = {k: v for k, v in _block(expert).items() if k != "dice_by_region"} if expert else None
    report["cases"] = per_case
    report["split"] = split_name
    report["centroids"] = "ground truth" if gt_centroids else "localization"
    report["subjects"] = sorted({c["subject"] for c in per_case})
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    return report


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)
