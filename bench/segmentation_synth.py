"""Segmentation at true centroids on CT synthesised from the train side's real masks.

    python bench/segmentation_synth.py [--subjects S,...] [--seed 2000] [--reps 1]
                                       [--sigma 0,20] [--segmentation PATH] [--refiner PATH|none]
                                       [--json FILE]

For every mask of the subjects (default: every mask of the split's train side) ``--reps`` volumes
are synthesised (``pipeline.synthesis.generate.synthesize``: real anatomy posed and fractured at
random, randomised appearance; seeds of their own, not the training caches' seed 0), segmented by
the shipped networks at the volume's true centroids (``pipeline.segmentation.infer.segment``), and
scored per whole vertebra (Dice against the synthesised labels) by region; ``--jitter-mm`` moves
the centroids at random first and ``--offset-mm`` all of them cranially, as a localizer's error
would. ``--sigma``: the
distance weight of voxels that two crops claim (``CONTESTED_SIGMA_MM``), 0 for none (the higher
probability alone decides); each setting is scored on the same volumes. The subjects are training
subjects: this chooses settings without the validation subjects, and does not replace the
validation figures (``spine-node evaluate --data ... --gt-centroids``). ``--segmentation`` and
``--refiner`` score candidate weights instead of the installed ones (as ``spine-node evaluate``).
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

    from pipeline.levels import BY_LABEL
    from pipeline.registry import load_model
    from pipeline.segmentation.infer import segment
    from pipeline.synthesis.held_out import add_volume_options, volumes_of_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_volume_options(ap, REPO.parent / "shared" / "data" / "real-spine")
    ap.add_argument("--sigma", default="0,20", help="distance weights in mm (0: none)")
    ap.add_argument("--jitter-mm", type=float, default=0.0,
                    help="move each centroid by this much (SD per axis): a localizer's error")
    ap.add_argument("--offset-mm", type=float, default=0.0,
                    help="move all centroids of a volume together by this much along the spine "
                         "(cranially): a localizer's systematic error")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--segmentation", type=Path, help="a 2 mm network's best.pt instead of the installed one")
    ap.add_argument("--refiner", help="a refiner's best.pt instead of the installed one, or 'none'")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.segmentation is None and a.refiner is None:
        model = load_model("segmentation", "cpu")
    else:
        from pipeline.segmentation.train import candidate_model

        try:
            model = candidate_model(a.segmentation, a.refiner)
        except FileNotFoundError as e:
            ap.error(str(e))
    sigmas = [float(v) for v in a.sigma.split(",")]
    scores: dict[float, dict[str, list[float]]] = {s: {} for s in sigmas}
    volumes = volumes_of_options(ap, a)
    for case, cut, rng in volumes:
        cents = sorted(case.centroids_mm.items(), key=lambda t: -t[1][2])
        if a.offset_mm:
            cents = [(k, (c[0], c[1], c[2] + a.offset_mm)) for k, c in cents]
        if a.jitter_mm > 0:
            cents = [(k, tuple(np.asarray(c) + rng.normal(0.0, a.jitter_mm, 3))) for k, c in cents]
        truth = sitk.GetArrayFromImage(case.labels)
        for s in sigmas:
            res = segment(case.ct, cents, model, "cpu", contested_sigma_mm=s or None)
            pred = sitk.GetArrayFromImage(sitk.Resample(res.label_map, case.labels, sitk.Transform(),
                                                        sitk.sitkNearestNeighbor, 0))
            for k, _ in cents:
                if k in cut:
                    continue
                p, t = pred == k, truth == k
                dice = 2.0 * float((p & t).sum()) / max(float(p.sum() + t.sum()), 1.0)
                scores[s].setdefault(BY_LABEL[k].region, []).append(dice)
    report = {}
    for s in sigmas:
        every = [d for v in scores[s].values() for d in v]
        report[str(s)] = {"dice": float(np.mean(every)) if every else None, "vertebrae": len(every),
                          "by_region": {k: {"dice": float(np.mean(v)), "vertebrae": len(v)}
                                        for k, v in sorted(scores[s].items())}}
        print(f"sigma {s:g} mm: Dice {report[str(s)]['dice']:.4f} ({len(every)} vertebrae); "
              + ", ".join(f"{k} {np.mean(v):.4f} ({len(v)})" for k, v in sorted(scores[s].items())))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
