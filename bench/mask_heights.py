"""Genant heights of real vertebral bodies measured on expert masks alone (no CT, no network).

    python bench/mask_heights.py [--subjects S,...] [--json FILE]

For every whole vertebra of the masks of ``--subjects`` (default: the split's train side) the six
points are placed on the mask's mid-sagittal body section exactly as the keypoint network's
training targets are (``pipeline.keypoints.real_samples.mask_keypoints_mm``), and the heights
HA, HM, HP graded by the product's rule (``pipeline.genant.within_loss``: 1 - min/max). Printed
per level: the vertebrae that are normal or unrated, their median HA/HP and HM/max ratios, and
how many of them the within-vertebra rule alone would call fractured (loss >= 20 %). This is the
floor that perfect keypoints would leave on real anatomy; the rated fractures are listed apart.
Also printed: every whole vertebra's largest height against its level's typical height
(``pipeline.genant.TYPICAL_BODY_HEIGHT_MM``), the spread that ``MAX_TYPICAL_FACTOR`` must allow.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def mask_heights(data: Path, subjects: list[str] | None) -> list[dict]:
    """One row per whole vertebra: subject, mask file, level, rated grade (or None), heights."""
    import SimpleITK as sitk

    from pipeline.findings import Heights
    from pipeline.genant import within_loss
    from pipeline.keypoints.plane import spine_axes
    from pipeline.keypoints.real_samples import mask_keypoints_mm
    from pipeline.levels import level
    from pipeline.realdata.truth import axial_lps
    from pipeline.synthesis.geometry import label_centroids
    from pipeline.synthesis.held_out import train_side
    from pipeline.synthesis.seg_source import find_masks

    rows = []
    for m in find_masks(data, train_side(subjects)):
        labels = axial_lps(m.read()[0])
        arr = sitk.GetArrayViewFromImage(labels)
        cents = label_centroids(labels)
        order = sorted(cents, key=lambda k: level(k).order)
        ups = dict(zip(order, spine_axes([level(k).order for k in order], [cents[k] for k in order])))
        for k in order:
            z = np.nonzero((arr == k).any(axis=(1, 2)))[0]
            if z.min() == 0 or z.max() == arr.shape[0] - 1:
                continue                                     # cut by the mask's field of view
            kp = mask_keypoints_mm(labels, k, cents[k], ups[k])
            if kp is None:
                continue
            p = {n: np.asarray(v) for n, v in kp.items()}
            h = Heights(*(float(np.linalg.norm(p[a] - p[b])) for a, b in
                          (("A1", "A2"), ("M1", "M2"), ("P1", "P2"))))
            rows.append({"subject": m.subject, "mask": m.labels.name, "level": level(k).name,
                         "order": level(k).order, "grade": m.grades.get(k),
                         "heights_mm": [h.anterior, h.middle, h.posterior],
                         "within_loss": within_loss(h)[0]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    from pipeline.genant import FRACTURE_LOSS, TYPICAL_BODY_HEIGHT_MM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-spine")
    ap.add_argument("--subjects", help="train-side subjects separated by commas (default: all)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    try:
        rows = mask_heights(a.data, a.subjects.split(",") if a.subjects else None)
    except ValueError as e:
        ap.error(str(e))
    normal = [r for r in rows if r["grade"] in (None, 0)]
    by_level: dict[str, list[dict]] = {}
    for r in sorted(normal, key=lambda r: r["order"]):
        by_level.setdefault(r["level"], []).append(r)
    report = {"vertebrae": len(rows), "normal_or_unrated": len(normal),
              "normal_called_fractured_by_heights": sum(r["within_loss"] >= FRACTURE_LOSS for r in normal),
              "levels": {}, "rated_fractures": [r for r in rows if r["grade"] not in (None, 0)]}
    for name, rs in by_level.items():
        h = np.array([r["heights_mm"] for r in rs])
        report["levels"][name] = {
            "vertebrae": len(rs), "median_ha_hp": float(np.median(h[:, 0] / h[:, 2])),
            "median_hm_max": float(np.median(h[:, 1] / h.max(axis=1))),
            "loss_20_or_more": int(sum(r["within_loss"] >= FRACTURE_LOSS for r in rs))}
        lv = report["levels"][name]
        print(f"{name:4s} {lv['vertebrae']:2d} normal or unrated: HA/HP {lv['median_ha_hp']:.2f}, "
              f"HM/max {lv['median_hm_max']:.2f}, loss >= 20 %: {lv['loss_20_or_more']}")
    print(f"{report['normal_called_fractured_by_heights']} of {len(normal)} normal or unrated "
          f"vertebrae have a within-vertebra loss of 20 % or more on their expert mask; "
          f"{len(report['rated_fractures'])} rated fractures: "
          + ", ".join(f"{r['subject']} {r['level']} grade {r['grade']} loss {r['within_loss']:.2f}"
                      for r in report["rated_fractures"]))
    ratios = np.array([max(r["heights_mm"]) / TYPICAL_BODY_HEIGHT_MM[r["level"]] for r in rows
                       if r["level"] in TYPICAL_BODY_HEIGHT_MM])
    if len(ratios):
        report["largest_height_over_typical"] = {"vertebrae": len(ratios), "median": float(np.median(ratios)),
                                                 "max": float(ratios.max())}
        print(f"largest height / typical height of the level: median {np.median(ratios):.2f}, "
              f"max {ratios.max():.2f} ({len(ratios)} whole vertebrae)")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
