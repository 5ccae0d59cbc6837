"""Genant grading at true centroids on CT synthesised from the train side's real masks.

    python bench/grading_synth.py [--subjects S,...] [--seed 2000] [--reps 1] [--json FILE]

For every mask of the subjects (default: every mask of the split's train side) ``--reps`` volumes
are synthesised (``pipeline.synthesis.generate.synthesize``: real anatomy posed at random, random
fractures of known Genant grade, the masks' own rated fractures kept, randomised appearance; seeds
of their own, not the training caches' seed 0) and analysed by the shipped pipeline at their true
centroids (``pipeline.run.analyse``: segmentation, keypoints, grading). Every whole vertebra whose
state is known (simulated fracture, rated real fracture, or normal) and that the pipeline graded
counts: grade 0 called normal, grade 2-3 called fractured, grade 3 called grade 2 or more, grade 1
called fractured, exact grade - the issue's grading targets, measured without the validation
subjects. The figures that count are ``spine-node evaluate --data ...``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    import SimpleITK as sitk
    import torch

    from pipeline.realdata.evaluation import _Centroid, _Series
    from pipeline.run import analyse
    from pipeline.synthesis.extend import truncated_labels
    from pipeline.synthesis.generate import SynthOptions, synthesize
    from pipeline.synthesis.geometry import on_grid_of
    from pipeline.synthesis.seg_source import find_masks, training_subjects

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-spine")
    ap.add_argument("--subjects", help="train-side subjects separated by commas (default: all)")
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.seed == 0:
        ap.error("seed 0 synthesises the training crops; choose another")
    torch.set_num_threads(a.threads)
    train = training_subjects()
    subjects = a.subjects.split(",") if a.subjects else train
    outside = sorted(set(subjects) - set(train))
    if outside:
        ap.error(f"not on the train side of the split: {', '.join(outside)}")
    truth, called = [], []
    for mi, mask in enumerate(find_masks(a.data, subjects)):
        labels0 = sitk.ReadImage(str(mask.labels))
        sub = sitk.ReadImage(str(mask.subregions)) if mask.subregions is not None else None
        if sub is not None:
            sub = on_grid_of(sub, labels0)
        cut_in_source = set(truncated_labels(labels0))
        for r in range(a.reps):
            rng = np.random.default_rng([a.seed, mi, r])
            case = synthesize(labels0, rng, sub, SynthOptions(), mask.grades)
            cut = set(truncated_labels(case.labels)) | cut_in_source
            cents = [_Centroid(k, tuple(c), k in cut)
                     for k, c in sorted(case.centroids_mm.items(), key=lambda t: -t[1][2])]
            result = analyse(_Series(case.ct, "synth", "synth"), "cpu", centroids=cents)
            for f in result.vertebrae:
                k = int(f.label)
                if k in cut or k in case.uncertain or not f.assessed:
                    continue
                truth.append(case.fractures.get(k, (0, "normal"))[0])
                called.append(int(f.genant_grade))
    t, p = np.array(truth), np.array(called)

    def share(sel: np.ndarray, ok: np.ndarray) -> dict:
        return {"rate": float(ok[sel].mean()) if sel.any() else None, "n": int(sel.sum())}

    report = {"vertebrae": len(t),
              "grade0_called_normal": share(t == 0, p == 0),
              "grade2plus_called_fractured": share(t >= 2, p >= 1),
              "grade3_called_2plus": share(t == 3, p >= 2),
              "grade1_called_fractured": share(t == 1, p >= 1),
              "exact": float((p == t).mean()) if len(t) else None}
    print(f"{len(t)} graded vertebrae: " + ", ".join(
        f"{k} {v['rate']:.3f} ({v['n']})" if isinstance(v, dict) and v["rate"] is not None else f"{k} -"
        for k, v in report.items() if isinstance(v, dict)) + f", exact {report['exact']:.3f}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
