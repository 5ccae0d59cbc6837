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

import argparse
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


def localization_case(gt_vertebrae: Sequence[dict], predicted: Sequence[Any], seed: int | None = None) -> CaseLocalization:
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
    report["timings_s"] = {"localization_mean": _mean(runtimes), "localization_max": max(runtimes) if runtimes else None}
    report["cases"] = [c.as_dict() for c in cases]
    return report


def evaluate_localization(seeds: Iterable[int], device: str = "auto", model: Any = None,
                          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Phantoms of ``seeds`` (their randomised acquisition grid) through :func:`localize`."""
    from pipeline.localization.inference import localize
    from pipeline.phantom import generate

    cases = []
    for seed in seeds:
        ph = generate(seed)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        found = localize(ph.ct, device=device, model=model, timings=timings)
        runtime = time.perf_counter() - t0
        case = localization_case(ph.gt["vertebrae"], found, seed)
        case.runtime_s = round(runtime, 3)
        case.extra = {"size": list(ph.ct.GetSize()), "spacing": [round(s, 3) for s in ph.ct.GetSpacing()],
                      "timings_s": {k: round(v, 3) for k, v in timings.items()}}
        log(f"seed {seed}: {case.identified}/{case.n_required} identified, "
            f"mean error {np.mean(list(case.errors_mm.values())) if case.errors_mm else float('nan'):.2f} mm, "
            f"fp {case.false_positives}, {runtime:.2f} s")
        cases.append(case)
    return localization_report(cases)


def evaluate(seeds: Iterable[int], device: str = "auto", json_path: Path | None = None,
             log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """All stages evaluated so far (localization); writes ``json_path`` when given."""
    report = evaluate_localization(list(seeds), device, log=log)
    report["seeds"] = list(seeds)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="evaluate the pipeline on phantom seeds")
    ap.add_argument("--seeds", default="9001-9010")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    report = evaluate(parse_seeds(args.seeds), args.device, args.json, log=print)
    print(json.dumps({k: report[k] for k in REPORT_KEYS + ("errors_over_mm", "false_positive_vertebrae", "timings_s")}, indent=2))


if __name__ == "__main__":
    main()
