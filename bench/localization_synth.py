"""Localization weight files on whole volumes synthesised from the real masks of the split's train
side with a seed of their own (``--seed``, not 0: the training volumes' seed): real vertebra
shapes and spines, randomised appearance, none of them a training volume. The subjects are
training subjects, so this selects weights without looking at the validation subjects; it does
not replace the validation figures (``spine-node evaluate --data``).

    python bench/localization_synth.py [--cases 26] [--seed 1000] [--threads 2]
                                       [--json FILE] WEIGHTS [WEIGHTS ...]

WEIGHTS: ``shipped`` (the installed ``localization.pt``) or weight files (``runs/.../best.pt``).
Prints per weight file the identification rate (right level within 20 mm), the false positives
and the training's validation score (mean penalty per vertebra: the error, 20 mm for a miss, 20
mm more for each false positive; lower is better) with the file's own decoder, threshold and
relabelling (as inference runs it), and the best decoder and threshold on these volumes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _load(spec: str) -> torch.nn.Module:
    from pipeline.registry import build_from_checkpoint, load_model

    if spec == "shipped":
        return load_model("localization", "cpu")
    return build_from_checkpoint(torch.load(spec, map_location="cpu", weights_only=True))


def main(argv: list[str] | None = None) -> dict:
    from pipeline.localization.infer import RELABEL, predict_heatmaps
    from pipeline.localization.train import case_detections, case_score, choose_decoder
    from pipeline.synthesis.loc_source import cached_synth_cases

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--cases", type=int, default=26)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-spine")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "cache-loc")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.seed == 0:
        ap.error("seed 0 synthesises the training volumes; choose another")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cases = cached_synth_cases(a.data, a.cases, 4.0, a.cache_dir, a.seed, print)
    print(f"{len(cases)} synthesised volumes (seed {a.seed}) in {time.perf_counter() - t0:.0f} s")
    report: dict = {}
    for spec in a.weights:
        model = _load(spec).eval()
        meta = model.meta
        relabel = bool(meta.get("relabel", RELABEL))
        with torch.inference_mode():
            maps = [predict_heatmaps(model, c.array, meta["patch"], c.pad_value, float(meta.get("overlap", 0.25)),
                                     "cpu") / float(meta.get("amplitude", 1.0)) for c in cases]
        own = [case_score(case_detections(h, c, float(meta["threshold"]), meta["decoder"], relabel), c)
               for h, c in zip(maps, cases)]
        n = sum(s["n"] for s in own)
        ident = sum(s["identified"] for s in own)
        best = choose_decoder(maps, cases, relabel=relabel)
        report[spec] = {"decoder": meta["decoder"], "threshold": meta["threshold"], "relabel": relabel,
                        "vertebrae": n, "id_rate": ident / max(n, 1), "false_positives": sum(s["fp"] for s in own),
                        "score": sum(s["penalty"] for s in own) / max(n, 1), "best_decoder": best}
        print(f"{spec}: id {ident / max(n, 1):.3f} ({ident}/{n}), false positives "
              f"{report[spec]['false_positives']}, score {report[spec]['score']:.2f} "
              f"({meta['decoder']}, threshold {meta['threshold']}, "
              f"relabel {relabel}); best here: {best['decoder']} {best['threshold']} id {best['id_rate']:.3f} "
              f"fp {best['fp']}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
