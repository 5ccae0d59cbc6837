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
    import torch

    from pipeline.realdata.evaluation import _Centroid, _Series
    from pipeline.run import analyse
    from pipeline.synthesis.held_out import add_volume_options, volumes_of_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_volume_options(ap, REPO.parent / "shared" / "data" / "real-spine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    volumes = volumes_of_options(ap, a)
    truth, called = [], []
    for case, cut, _rng in volumes:
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
