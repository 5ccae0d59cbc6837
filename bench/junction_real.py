"""Junction classifier weights on real CT at the expert centroids.

    python bench/junction_real.py [--split validation|train] [--subjects S,...] [--json FILE]
                                  WEIGHTS [WEIGHTS ...]

WEIGHTS: ``shipped`` (the installed ``junction.pt``) or a run's ``best.pt`` (its own threshold).
For every scan of the subjects (default: the split's validation side) the decision at the
lowest expert vertebra ("last" is right where the sacrum lies below it in the field of view) and
at the chain without that vertebra ("below" is right there), with both probabilities. The
pipeline asks the same questions at the localizer's centroids (``spine-node evaluate``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _load(spec: str) -> torch.nn.Module:
    from pipeline.junction.net import build_junction
    from pipeline.registry import load_model

    if spec == "shipped":
        return load_model("junction", "cpu")
    ck = torch.load(spec, map_location="cpu", weights_only=False)
    model = build_junction(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    model.meta = {"threshold": float(ck["threshold"])}
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    from pipeline.junction.infer import find_junction
    from pipeline.numbering import TYPICAL_STEP_MM
    from pipeline.realdata.pack import iter_pack_cases
    from pipeline.realdata.split import load_split
    from pipeline.realdata.truth import axial_lps, truth_vertebrae

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-spine")
    ap.add_argument("--split", choices=("validation", "train"), default="validation")
    ap.add_argument("--subjects", help="subjects separated by commas instead of a split side")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    subjects = a.subjects.split(",") if a.subjects else list(load_split().side(a.split))
    torch.set_num_threads(2)
    scans = []
    for case in iter_pack_cases(a.data, subjects):
        truth = sorted(truth_vertebrae(case, axial_lps(case.mask)), key=lambda v: -v["centroid_mm"][2])
        scans.append((case.case_id, axial_lps(case.ct), [v["centroid_mm"] for v in truth],
                      [v["name"] for v in truth]))
    report: dict = {}
    for spec in a.weights:
        model = _load(spec)
        rows = report.setdefault(spec, {})
        for case_id, ct, cents, names in scans:
            row = {"levels": f"{names[0]}-{names[-1]}"}
            for key, chain in (("whole", cents), ("without_lowest", cents[:-1])):
                if len(chain) >= 2:
                    j = find_junction(ct, chain, TYPICAL_STEP_MM["L"], model)
                    row[key] = {"state": j.state, "p_last": round(j.p_last, 3),
                                "p_below": round(j.p_below, 3)}
            rows[case_id] = row
            print(f"{spec} {case_id} ({row['levels']}): " + "; ".join(
                f"{k} {v['state']} {v['p_last']:.3f} / {v['p_below']:.3f} below"
                for k, v in row.items() if k != "levels"))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
