"""Choose a localization weight file's decoder and presence threshold on validation phantoms.

``spine-node train calibrate-localization WEIGHTS.pt --val-seeds 8001-8004 --out OUT.pt``:
whole-volume inference on the validation cases, every (decoder, threshold) of
:func:`pipeline.localization.train.choose_decoder`, the best written into the file's ``meta``.
Never pass evaluation seeds (9001-9010).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.localization.dataset import cached_phantom_cases
from pipeline.localization.infer import predict_heatmaps
from pipeline.localization.train import choose_decoder
from pipeline.registry import build_from_checkpoint


def calibrate(weights: Path, val_seeds: list[int], cache_dir: Path, out: Path,
              overlap: float | None = None) -> dict:
    """``overlap``: the patch overlap of inference to calibrate for (and write into the meta;
    default: the file's own)."""
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    model = build_from_checkpoint(ckpt)
    meta = model.meta
    overlap = float(meta.get("overlap", 0.25)) if overlap is None else float(overlap)
    cases = cached_phantom_cases(val_seeds, float(meta["spacing_mm"]), cache_dir)
    maps = [predict_heatmaps(model, c.array, meta["patch"], c.pad_value, overlap)
            / float(meta.get("amplitude", 1.0)) for c in cases]
    best = choose_decoder(maps, cases)
    ckpt["meta"].update({"decoder": best["decoder"], "threshold": best["threshold"], "overlap": overlap,
                         "calibration": {k: best[k] for k in ("id_rate", "error_mm", "fp", "score")}
                         | {"val_seeds": list(val_seeds)}})
    torch.save(ckpt, out)
    return best
