"""Junction classifier weights on CT synthesised from the train side's masks, with and without
contrast in the spinal canal.

    python bench/junction_synth.py [--seed 300] [--cases 24] [--myelography 0,1] [--json FILE]
                                   WEIGHTS [WEIGHTS ...]

WEIGHTS: ``shipped`` or a run's ``best.pt`` (its own threshold), as ``bench/junction_real.py``.
``--cases`` volumes (seeds ``[seed, k]`` of their own; the trainers use 100 and 200) are drawn
with a sacrum below a last lumbar vertebra kept whole; each is synthesised once per share in
``--myelography`` (the anatomy and pose are the same, the canal is filled or not). At the true
centroids it reports how often the decision at the lowest vertebra is "last" (right) and at the
chain without it "below" (right), and how many decisions were wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def main(argv: list[str] | None = None) -> dict:
    from junction_real import _load

    from pipeline.junction.infer import decide, scores, step_below
    from pipeline.junction.volumes import synth_volume
    from pipeline.synthesis.generate import SynthOptions
    from pipeline.synthesis.held_out import train_side
    from pipeline.synthesis.seg_source import find_masks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-spine")
    ap.add_argument("--seed", type=int, default=300)
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--myelography", default="0,1", help="shares separated by commas")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.seed in (100, 200):
        ap.error("seeds 100 and 200 synthesise the trainers' volumes; choose another")
    torch.set_num_threads(2)
    shares = [float(s) for s in a.myelography.split(",")]
    masks = find_masks(a.data, train_side())
    trials: dict[float, list] = {s: [] for s in shares}
    k = 0
    while len(trials[shares[0]]) < a.cases and k < 20 * a.cases:
        mask = masks[k % len(masks)]
        got = {}
        for share in shares:
            opts = SynthOptions().with_scene(sacrum=1.0, myelography=share)
            vol = synth_volume(mask, np.random.default_rng([a.seed, k]), f"{a.seed}-{k}", opts,
                               keep_last=True)
            cents = [vol.centers[r] for r in vol.chain()]
            if np.isnan(vol.s1[0]) or len(cents) < 3:
                break
            got[share] = (vol, cents)
        k += 1
        if len(got) == len(shares):
            for share, tr in got.items():
                trials[share].append(tr)
    report: dict = {}
    for spec in a.weights:
        model = _load(spec)
        t = float(model.meta["threshold"])
        for share in shares:
            last = below = wrong = 0
            for vol, cents in trials[share]:
                p = scores(model, vol.hu, [cents[-1], cents[-1] + step_below(cents, 0.0)],
                           vol.spacing_mm)
                q = scores(model, vol.hu, [cents[-2], cents[-2] + step_below(cents[:-1], 0.0)],
                           vol.spacing_mm)
                d1, d2 = decide(p[0], p[1], t), decide(q[0], q[1], t)
                last += d1 == "last"
                below += d2 == "below"
                wrong += (d1 not in ("last", "none")) + (d2 not in ("below", "none"))
            n = len(trials[share])
            row = {"volumes": n, "last_right": last / max(n, 1), "below_right": below / max(n, 1),
                   "wrong": wrong}
            report.setdefault(spec, {})[f"myelography {share:g}"] = row
            print(f"{spec} myelography {share:g}: {n} volumes, 'last' right {last}/{n}, 'below' "
                  f"right {below}/{n}, wrong decisions {wrong}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
