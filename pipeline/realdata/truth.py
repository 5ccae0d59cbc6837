"""The truth of a real case as the pipeline sees it: the axial LPS layout of a DICOM series and
the per-vertebra list that gt.json gives for a phantom (label, name, centroid, partial, grade).

A vertebra is *partial* (neither required nor a false positive, not graded) when its mask
reaches the first or last slice along the patient's cranio-caudal axis (cut by the field of
view), or holds less than :data:`SLIVER_FRACTION` of the case's median vertebra volume.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.levels import BY_LABEL
from pipeline.realdata.pack import RealCase

#: A vertebra mask holding less than this share of the case's median vertebra volume is a sliver.
SLIVER_FRACTION = 0.25


def axial_lps(image: sitk.Image) -> sitk.Image:
    """The image with its axes permuted and flipped to L, P, S (an axial DICOM series' layout)."""
    return sitk.DICOMOrient(image, "LPS")


def truth_vertebrae(case: RealCase, mask_lps: sitk.Image) -> list[dict[str, Any]]:
    """The case's vertebrae as gt.json lists them (label, name, centroid_mm, partial, grade)."""
    arr = sitk.GetArrayViewFromImage(mask_lps)  # [z, y, x]; z = S after axial_lps
    labels = [int(v) for v in np.unique(arr) if int(v) in BY_LABEL]
    volumes = {lab: int((arr == lab).sum()) for lab in labels}
    median = float(np.median(list(volumes.values()))) if volumes else 0.0
    first, last = arr[0], arr[-1]
    out = []
    for lab in labels:
        cut = bool((first == lab).any() or (last == lab).any())
        sliver = volumes[lab] < SLIVER_FRACTION * median
        grade = case.grades.get(lab)
        out.append({"label": lab, "name": BY_LABEL[lab].name,
                    "centroid_mm": list(case.centroids_mm.get(lab, (np.nan,) * 3)),
                    "partial": cut or sliver,
                    "partial_reason": "cut by the field of view" if cut else ("sliver" if sliver else None),
                    "genant_grade": grade, "fractured": None if grade is None else grade >= 1})
    return out


def whole_truth(case: RealCase) -> tuple[sitk.Image, sitk.Image, list[dict[str, Any]]]:
    """The case's CT and mask in the axial LPS layout and its whole vertebrae (not cut by the
    field of view, with a finite centroid), as :func:`truth_vertebrae` gives them."""
    ct, mask = axial_lps(case.ct), axial_lps(case.mask)
    verts = [v for v in truth_vertebrae(case, mask)
             if not v["partial"] and np.all(np.isfinite(v["centroid_mm"]))]
    return ct, mask, verts
