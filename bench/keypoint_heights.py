"""Keypoint networks against the expert masks of the real-spine pack: for every whole vertebra
of one side of the split, the six points placed on the expert mask's body section
(:mod:`pipeline.keypoints.real_samples`) against the network's, on the plane centred on the
expert points (the network's error alone, without the localization's or the first pass's).

    python bench/keypoint_heights.py [--split validation] [--data ../shared/data/real-spine]
                                     WEIGHTS [WEIGHTS ...]

WEIGHTS: shipped weight files (``pipeline/weights/keypoints.pt``) or training checkpoints
(``runs/.../best.pt``). Prints per case and overall the mean point error and the mean absolute
height error (HA, HM, HP) in mm.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> torch.nn.Module:
    from pipeline.nets.mscn import build_mscn
    from pipeline.registry import build_from_checkpoint

    ck = torch.load(path, map_location="cpu", weights_only=False)
    if "builder" in ck:
        return build_from_checkpoint(ck)
    model = build_mscn(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    from pipeline.keypoints.infer import decode_keypoints
    from pipeline.keypoints.plane import PLANE_SPACING_MM
    from pipeline.keypoints.real_samples import real_keypoint_samples
    from pipeline.realdata.pack import iter_pack_cases
    from pipeline.realdata.split import load_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+", type=Path)
    ap.add_argument("--split", default="validation", choices=("validation", "train"))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-spine")
    a = ap.parse_args(argv)
    samples = real_keypoint_samples(iter_pack_cases(a.data, list(getattr(load_split(), a.split))), 1)
    cases = [n.rsplit("/", 1)[0] for n in samples.names]
    report: dict = {}
    for w in a.weights:
        model = _load(w)
        x = torch.from_numpy(samples.inputs.astype(np.float32))
        if not getattr(model, "meta", {}).get("use_mask", False):
            x[:, 1] = 0.0
        with torch.no_grad():
            heatmaps = model(x).numpy()
        point, height = [], []
        for h, truth in zip(heatmaps, samples.points):
            p = decode_keypoints(h, PLANE_SPACING_MM)
            point.append(float(np.linalg.norm(p - truth, axis=1).mean()) * PLANE_SPACING_MM)
            height.append(float(np.mean([abs(np.linalg.norm(p[i] - p[j]) - np.linalg.norm(truth[i] - truth[j]))
                                         for i, j in ((0, 1), (2, 3), (4, 5))])) * PLANE_SPACING_MM)
        per_case = {c: round(float(np.mean([height[k] for k, cc in enumerate(cases) if cc == c])), 2)
                    for c in dict.fromkeys(cases)}
        report[str(w)] = {"vertebrae": len(point), "point_error_mm": round(float(np.mean(point)), 2),
                          "height_error_mm": round(float(np.mean(height)), 2),
                          "height_error_by_case_mm": per_case}
        print(f"{w}: {len(point)} vertebrae ({a.split}), point error {np.mean(point):.2f} mm, "
              f"height error {np.mean(height):.2f} mm")
        for c, v in per_case.items():
            print(f"    {c}: height error {v:.2f} mm")
    return report


if __name__ == "__main__":
    main()
