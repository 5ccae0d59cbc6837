"""``spine-node evaluate``: phantoms with known ground truth through the pipeline, and metrics.

The report carries at least the DESIGN.md keys (contract): ``id_rate``, ``localization_error_mm``,
``dice``, ``assd_mm``, ``mssd_mm``, ``precision``, ``recall``, ``fracture_sensitivity``,
``fracture_specificity``, ``genant_exact``, ``genant_weighted_kappa`` (fractions in 0..1,
distances in mm, means over cases). A key whose stage is not evaluated yet is ``null``.

Each metric is one function of per-case results; a stage adds its per-case function and its
entries in :data:`METRICS`.

Localization (issue 4; paper section 3.4.4, eq. 27; VerSe conventions):

- ``id_rate``: share of the case's (non-partial) vertebrae whose predicted centroid carries the
  right label, lies within 20 mm of the true centroid and is closer to it than to any other true
  centroid.
- ``localization_error_mm``: mean distance between predicted and true centroid over the
  vertebrae predicted with their label (a label off by one counts with its full distance).
- ``precision`` / ``recall``: vertebra detection, whatever the label: predictions and true
  vertebrae matched one to one within 20 mm (closest pairs first). Precision = matched
  predictions / predictions (a prediction on a partial vertebra counts as matched: it is there);
  recall = matched non-partial vertebrae / non-partial vertebrae.
- ``errors_over_mm``: share of vertebrae with an error over 4, 10 and 20 mm (a missed vertebra
  counts as over all three), as the paper's Table 4.

Partial vertebrae (gt ``partial``: cut by the field of view) are neither required nor counted
as false positives: the centroid of a cut vertebra is not well defined.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

ID_RADIUS_MM = 20.0
ERROR_BINS_MM = (4.0, 10.0, 20.0)
#: The contract keys of the JSON report (DESIGN.md, "Command line").
REPORT_KEYS = ("id_rate", "localization_error_mm", "dice", "assd_mm", "mssd_mm", "precision", "recall",
               "fracture_sensitivity", "fracture_specificity", "genant_exact", "genant_weighted_kappa")


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """``"9001-9010"``, ``"1,2,5-7"`` or a list of ints -> sorted unique seeds."""
    if not isinstance(spec, str):
        return sorted({int(s) for s in spec})
    seeds: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        if sep:
            lo, hi = int(a), int(b)
            if lo > hi:
                raise ValueError(f"seed range {part!r} runs backwards")
            seeds.update(range(lo, hi + 1))
        else:
            seeds.add(int(part))
    return sorted(seeds)


@dataclass
class CaseLocalization:
    """Localization outcome of one case (all distances in mm)."""

    seed: int | None
    n_required: int                     # non-partial true vertebrae
    identified: int
    errors_mm: dict[str, float]         # level name -> distance, for levels predicted with their label
    missed: list[str]                   # non-partial true levels without a prediction of that label
    n_predicted: int
    detection_matched_predictions: int
    detection_matched_required: int
    false_positives: list[str]          # predictions matching no true vertebra within 20 mm
    runtime_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _xyz(v: Any) -> np.ndarray:
    return np.asarray(v["centroid_mm"] if isinstance(v, dict) else v.centroid_mm, dtype=float)


def _field(v: Any, name: str, default: Any = None) -> Any:
    return v.get(name, default) if isinstance(v, dict) else getattr(v, name, default)


def localization_case(gt_vertebrae: Sequence[dict], predicted: Sequence[Any],
                      seed: int | None = None) -> CaseLocalization:
    """Compare predicted vertebrae (``label``, ``name``, ``centroid_mm``) with gt.json's list."""
    gt_pos = {int(v["label"]): _xyz(v) for v in gt_vertebrae}
    gt_name = {int(v["label"]): v["name"] for v in gt_vertebrae}
    required = [int(v["label"]) for v in gt_vertebrae if not v.get("partial")]
    pred = {int(_field(p, "label")): _xyz(p) for p in predicted}
    labels = list(gt_pos)
    gt_arr = np.array([gt_pos[l] for l in labels]) if labels else np.zeros((0, 3))
    errors, identified, missed = {}, 0, []
    for lab in required:
        if lab not in pred:
            missed.append(gt_name[lab])
            continue
        d = float(np.linalg.norm(pred[lab] - gt_pos[lab]))
        errors[gt_name[lab]] = round(d, 3)
        nearest = labels[int(np.argmin(np.linalg.norm(gt_arr - pred[lab], axis=1)))]
        identified += d <= ID_RADIUS_MM and nearest == lab
    # one-to-one detection matching, closest pairs first
    pairs = sorted((float(np.linalg.norm(p - gt_pos[g])), pl, g) for pl, p in pred.items() for g in gt_pos)
    used_p, used_g = set(), set()
    for d, pl, g in pairs:
        if d > ID_RADIUS_MM:
            break
        if pl in used_p or g in used_g:
            continue
        used_p.add(pl)
        used_g.add(g)
    fps = [_field(p, "name") or str(_field(p, "label")) for p in predicted if int(_field(p, "label")) not in used_p]
    return CaseLocalization(seed, len(required), int(identified), errors, missed, len(pred), len(used_p),
                            len(used_g & set(required)), fps)


# ---- per-metric functions over cases (means over cases, DESIGN.md) -------------------------------
def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def id_rate(cases: Sequence[CaseLocalization]) -> float | None:
    return _mean(c.identified / c.n_required for c in cases if c.n_required)


def localization_error_mm(cases: Sequence[CaseLocalization]) -> float | None:
    return _mean(float(np.mean(list(c.errors_mm.values()))) if c.errors_mm else None for c in cases)


def detection_precision(cases: Sequence[CaseLocalization]) -> float | None:
    return _mean(c.detection_matched_predictions / c.n_predicted if c.n_predicted else 1.0 for c in cases)


def detection_recall(cases: Sequence[CaseLocalization]) -> float | None:
    return _mean(c.detection_matched_required / c.n_required for c in cases if c.n_required)


def errors_over_mm(cases: Sequence[CaseLocalization], bins: Sequence[float] = ERROR_BINS_MM) -> dict[str, float]:
    """Share of all required vertebrae (pooled) with an error over each bin; missed = over all."""
    errs = [e for c in cases for name, e in c.errors_mm.items()]
    n = sum(c.n_required for c in cases)
    n_missed = sum(len(c.missed) for c in cases)
    return {f">{b:g}": (sum(e > b for e in errs) + n_missed) / n if n else None for b in bins}


#: key -> function of the per-case localization results
LOCALIZATION_METRICS: dict[str, Callable[[Sequence[CaseLocalization]], Any]] = {
    "id_rate": id_rate,
    "localization_error_mm": localization_error_mm,
    "precision": detection_precision,
    "recall": detection_recall,
}


def localization_report(cases: Sequence[CaseLocalization]) -> dict[str, Any]:
    """The report with every contract key; the localization ones filled in."""
    report: dict[str, Any] = {k: None for k in REPORT_KEYS}
    for key, fn in LOCALIZATION_METRICS.items():
        report[key] = fn(cases)
    report["errors_over_mm"] = errors_over_mm(cases)
    report["false_positive_vertebrae"] = sum(len(c.false_positives) for c in cases)
    report["vertebrae_required"] = sum(c.n_required for c in cases)
    runtimes = [c.runtime_s for c in cases if c.runtime_s is not None]
    report["timings_s"] = {"localization_mean": _mean(runtimes),
                           "localization_max": max(runtimes) if runtimes else None}
    report["cases"] = [c.as_dict() for c in cases]
    return report


def compare_localization(seeds: Iterable[int], models: dict[str, Any], device: str = "auto",
                         log: Callable[[str], None] = lambda s: None,
                         acquisition: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Phantoms of ``seeds`` (their randomised acquisition grid, with ``acquisition``'s overrides
    as in :func:`evaluate_pipeline`) through :func:`localize` with each of ``models`` (name ->
    module with ``.meta``, or ``None`` for the shipped weights); each phantom is generated once.
    Returns name -> localization report."""
    from pipeline.localization.infer import localize
    from pipeline.phantom import generate
    from pipeline.registry import resolve_device

    dev = resolve_device(device)
    # weight files are loaded onto the CPU: each network goes where its inputs will be
    models = {name: (m.to(dev) if m is not None else None) for name, m in models.items()}
    cases: dict[str, list[CaseLocalization]] = {name: [] for name in models}
    for seed in seeds:
        ph = generate(seed, acquisition=acquisition)
        for name, model in models.items():
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            found = localize(ph.ct, device=device, model=model, timings=timings)
            runtime = time.perf_counter() - t0
            case = localization_case(ph.gt["vertebrae"], found, seed)
            case.runtime_s = round(runtime, 3)
            case.extra = {"size": list(ph.ct.GetSize()), "spacing": [round(s, 3) for s in ph.ct.GetSpacing()],
                          "timings_s": {k: round(v, 3) for k, v in timings.items()}}
            log(f"{name} seed {seed}: {case.identified}/{case.n_required} identified, mean error "
                f"{np.mean(list(case.errors_mm.values())) if case.errors_mm else float('nan'):.2f} mm, "
                f"missed {case.missed}, fp {case.false_positives}, {runtime:.2f} s")
            cases[name].append(case)
    return {name: localization_report(c) for name, c in cases.items()}


def evaluate_localization(seeds: Iterable[int], device: str = "auto", model: Any = None,
                          log: Callable[[str], None] = lambda s: None,
                          acquisition: dict[str, Any] | None = None) -> dict[str, Any]:
    """Phantoms of ``seeds`` through :func:`localize` (``model``: default the shipped weights)."""
    return compare_localization(seeds, {"localization": model}, device, log, acquisition)["localization"]


def evaluate(seeds: Iterable[int], device: str = "auto", json_path: Path | None = None,
             log: Callable[[str], None] = lambda s: None,
             acquisition: dict[str, Any] | None = None) -> dict[str, Any]:
    """All stages evaluated so far (localization); writes ``json_path`` when given."""
    report = evaluate_localization(list(seeds), device, log=log, acquisition=acquisition)
    report["seeds"] = list(seeds)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- segmentation and grading (issue 5; paper section 3.3, eq. 20-26) ------------------------------
#
# Per vertebra, on the study's own acquisition grid (the label map that ``process`` writes):
# - ``dice`` (eq. 20), ``precision`` (eq. 21) and ``recall`` (eq. 22) are the paper's voxel
#   overlaps of each true vertebra with the predicted vertebra of the same label; the localization
#   report's detection precision/recall move to ``detection_precision`` / ``detection_recall``.
# - ``assd_mm`` (eq. 23-24) and ``mssd_mm`` (eq. 25-26): surface distances in mm (surface = the
#   mask's voxels with a 6-neighbour outside), by Euclidean distance transforms with the grid's
#   spacing. A true vertebra without a prediction of its label counts Dice 0 and has no distance.
# Means first over the case's non-partial vertebrae, then over cases (DESIGN.md).
# - ``fracture_sensitivity`` / ``fracture_specificity``: per vertebra, pooled over all cases (a
#   case without a fracture has no sensitivity of its own); a missed true vertebra counts as
#   called normal.
# - ``genant_exact``: share of vertebrae whose grade equals the truth; ``genant_weighted_kappa``:
#   Cohen's kappa with QUADRATIC weights over grades 0-3, pooled (``genant_weighted_kappa_linear``
#   beside it). Partial vertebrae are left out of all of these.


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[float, float] | None:
    """(ASSD, MSSD) in mm of two boolean masks (eq. 23-26); ``None`` if either is empty."""
    from scipy import ndimage

    if not pred.any() or not gt.any():
        return None
    sp, sg = _surface(pred), _surface(gt)
    dg = ndimage.distance_transform_edt(~sg, sampling=spacing_zyx)
    dp = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)
    a, b = dg[sp], dp[sg]
    return float((a.sum() + b.sum()) / (len(a) + len(b))), float(max(a.max(), b.max()))


def segmentation_case(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing_zyx: Sequence[float],
                      gt_vertebrae: Sequence[dict]) -> dict[str, Any]:
    """Per-vertebra Dice, precision, recall, ASSD, MSSD of one case (arrays ``[z, y, x]``)."""
    per: dict[str, dict[str, float | None]] = {}
    for v in gt_vertebrae:
        if v.get("partial"):
            continue
        lab = int(v["label"])
        g = gt_labels == lab
        if not g.any():
            continue
        idx = np.argwhere(g | (pred_labels == lab))
        lo = np.maximum(idx.min(0) - 3, 0)
        hi = idx.max(0) + 4
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        gb, pb = gt_labels[box] == lab, pred_labels[box] == lab
        tp, fp, fn = int((gb & pb).sum()), int((~gb & pb).sum()), int((gb & ~pb).sum())
        dist = surface_distances(pb, gb, spacing_zyx)
        per[v["name"]] = {"dice": 2 * tp / (2 * tp + fp + fn), "precision": tp / (tp + fp) if tp + fp else 0.0,
                          "recall": tp / (tp + fn), "assd_mm": None if dist is None else dist[0],
                          "mssd_mm": None if dist is None else dist[1]}
    return per


def weighted_kappa(truth: Sequence[int], pred: Sequence[int], n: int = 4, weights: str = "quadratic") -> float | None:
    """Cohen's weighted kappa of two gradings in 0..n-1 (``quadratic`` or ``linear`` weights)."""
    if not truth:
        return None
    obs = np.zeros((n, n))
    for a, b in zip(truth, pred):
        obs[int(a), int(b)] += 1
    obs /= obs.sum()
    exp = np.outer(obs.sum(1), obs.sum(0))
    i, j = np.mgrid[0:n, 0:n]
    if weights == "quadratic":
        w = (i - j) ** 2 / (n - 1) ** 2
    else:
        w = np.abs(i - j) / (n - 1)
    den = (w * exp).sum()
    return float(1.0 - (w * obs).sum() / den) if den > 0 else 1.0


def grading_pairs(gt_vertebrae: Sequence[dict], findings: Sequence[Any]) -> list[dict[str, Any]]:
    """(truth, prediction) per non-partial true vertebra that Genant grades (not C1, C2:
    :data:`pipeline.genant.NOT_GRADED`); a vertebra not found is normal, grade 0."""
    from pipeline.genant import NOT_GRADED

    by_label = {int(_field(f, "label")): f for f in findings}
    out = []
    for v in gt_vertebrae:
        if v.get("partial") or v["name"] in NOT_GRADED:
            continue
        f = by_label.get(int(v["label"]))
        out.append({"name": v["name"], "gt_fractured": bool(v["fractured"]), "gt_grade": int(v["genant_grade"]),
                    "gt_morphology": v.get("morphology"),
                    "fractured": bool(f.fractured) if f is not None else False,
                    "grade": int(f.genant_grade) if f is not None else 0,
                    "morphology": f.morphology.value if f is not None else None,
                    "found": f is not None,
                    "assessed": bool(f.assessed) if f is not None else False,
                    "gt_heights_mm": v.get("heights_mm"),
                    "heights_mm": f.heights_mm.as_dict() if f is not None and f.heights_mm else None,
                    "source": f.grading_source if f is not None else None})
    return out


def segmentation_grading_report(seg_cases: Sequence[dict], grade_cases: Sequence[list]) -> dict[str, Any]:
    def case_mean(key: str) -> float | None:
        return _mean(_mean(v[key] for v in c.values()) for c in seg_cases if c)

    pairs = [p for c in grade_cases for p in c]
    pos = [p for p in pairs if p["gt_fractured"]]
    neg = [p for p in pairs if not p["gt_fractured"]]
    t = [p["gt_grade"] for p in pairs]
    g = [p["grade"] for p in pairs]
    return {
        "dice": case_mean("dice"), "assd_mm": case_mean("assd_mm"), "mssd_mm": case_mean("mssd_mm"),
        "precision": case_mean("precision"), "recall": case_mean("recall"),
        "fracture_sensitivity": sum(p["fractured"] for p in pos) / len(pos) if pos else None,
        "fracture_specificity": sum(not p["fractured"] for p in neg) / len(neg) if neg else None,
        "genant_exact": sum(a == b for a, b in zip(t, g)) / len(t) if t else None,
        "genant_weighted_kappa": weighted_kappa(t, g, weights="quadratic"),
        "genant_weighted_kappa_linear": weighted_kappa(t, g, weights="linear"),
        "genant_kappa_weights": "quadratic",
        "vertebrae_graded": len(pairs), "fractured_vertebrae": len(pos),
        "dice_min": min((v["dice"] for c in seg_cases for v in c.values()), default=None),
        "dice_by_region": dice_by_region(seg_cases),
    }


#: Regions of the spine by the first letter of a level's name (C7, T12, L1, ...).
REGIONS = {"C": "cervical", "T": "thoracic", "L": "lumbar"}


def dice_by_region(seg_cases: Sequence[dict]) -> dict[str, dict[str, float | int]]:
    """Mean Dice per vertebra (pooled over the cases, not per case) of each region, and the
    number of vertebrae behind it; regions without a vertebra are left out."""
    pooled: dict[str, list[float]] = {}
    for case in seg_cases:
        for name, m in case.items():
            region = REGIONS.get(name[:1])
            if region is not None:
                pooled.setdefault(region, []).append(m["dice"])
    return {r: {"dice": float(np.mean(pooled[r])), "vertebrae": len(pooled[r])}
            for r in REGIONS.values() if r in pooled}


def evaluate_pipeline(seeds: Iterable[int], device: str = "auto", json_path: Path | None = None,
                      gt_centroids: bool = False, models: dict[str, Any] | None = None,
                      log: Callable[[str], None] = lambda s: None,
                      acquisition: dict[str, Any] | None = None) -> dict[str, Any]:
    """Phantoms of ``seeds`` through :func:`pipeline.run.analyse` (the whole pipeline, as
    ``process`` runs it, on the phantom's acquisition grid in memory); every contract key.

    ``gt_centroids``: start from the true centroids instead of the localization (evaluates the
    segmentation and grading alone; the localization keys are then those of the truth).
    ``acquisition``: overrides of the seeds' acquisitions (:func:`pipeline.phantom.generate`),
    e.g. ``{"slice_spacing": 3.0, "slice_thickness": 3.0, "n_slices": 300}`` to measure the
    pipeline on thick-slice whole-spine scans; recorded in the report.
    """
    import SimpleITK as sitk

    from pipeline.phantom import generate
    from pipeline.run import analyse

    seeds = list(seeds)
    loc_cases, seg_cases, grade_cases, runtimes = [], [], [], []
    for seed in seeds:
        ph = generate(seed, acquisition=acquisition)
        series = _PhantomSeries(ph)
        cents = None
        if gt_centroids:
            cents = [_Centroid(int(v["label"]), tuple(v["centroid_mm"]), bool(v.get("partial")))
                     for v in ph.gt["vertebrae"]]
        t0 = time.perf_counter()
        result = analyse(series, device=device, models=models, centroids=cents)
        runtime = time.perf_counter() - t0
        runtimes.append(runtime)
        loc = localization_case(ph.gt["vertebrae"], result.vertebrae, seed)
        loc.runtime_s = round(runtime, 3)
        loc_cases.append(loc)
        pred = sitk.GetArrayFromImage(result.label_map)
        gt = sitk.GetArrayFromImage(ph.labels)
        seg = segmentation_case(pred, gt, ph.ct.GetSpacing()[::-1], ph.gt["vertebrae"])
        seg_cases.append(seg)
        pairs = grading_pairs(ph.gt["vertebrae"], result.vertebrae)
        grade_cases.append(pairs)
        loc.extra = {"segmentation": seg, "grading": pairs,
                     "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()}}
        dices = [v["dice"] for v in seg.values()]
        log(f"seed {seed}: {loc.identified}/{loc.n_required} identified, dice "
            f"{np.mean(dices) if dices else float('nan'):.4f}, grades "
            f"{[(p['name'], p['gt_grade'], p['grade']) for p in pairs if p['gt_grade'] or p['grade']]}, "
            f"{runtime:.1f} s")
    report = localization_report(loc_cases)
    report["detection_precision"] = report["precision"]
    report["detection_recall"] = report["recall"]
    report.update(segmentation_grading_report(seg_cases, grade_cases))
    report["timings_s"] = {"analyse_mean": _mean(runtimes), "analyse_max": max(runtimes) if runtimes else None}
    report["seeds"] = seeds
    report["centroids"] = "ground truth" if gt_centroids else "localization"
    report["acquisition"] = dict(acquisition) if acquisition else "each seed's own"
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass
class _Centroid:
    label: int
    centroid_mm: tuple[float, float, float]
    partial: bool = False


class _PhantomSeries:
    """The in-memory phantom as :func:`pipeline.run.analyse` expects a loaded series."""

    def __init__(self, ph: Any) -> None:
        import SimpleITK as sitk

        self.image = sitk.Cast(ph.ct, sitk.sitkFloat32)
        self.study_instance_uid = ph.gt.get("study_instance_uid", "")
        self.series_instance_uid = ph.gt.get("series_instance_uid", "")
