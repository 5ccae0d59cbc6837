"""Whole volumes synthesised from real masks as training cases of the localization network.

Each case is one real training mask (the ``train`` side of the split) posed on a 2 mm grid,
possibly fractured, extended by a level at its ends and cut at random along the spine, and
rendered with a random appearance (:func:`pipeline.synthesis.generate.synthesize`), then
prepared on the network's grid (:func:`pipeline.localization.dataset.make_case`). Vertebrae
that the field of view or the mask's own edge cuts are marked partial. The localization
network's 4 mm grid loses nothing to the 2 mm synthesis, which costs an eighth of 1 mm.
Cases are cached one file each, keyed by the seed.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.synthesis.generate import SynthOptions, synthesize
from pipeline.synthesis.seg_source import RealMask, find_masks, training_subjects

#: Spacing of the synthesised volumes (mm).
SYNTH_SPACING_MM = 2.0


def synth_case(mask: RealMask, rng: np.random.Generator, spacing_mm: float, name: str):
    """One synthesised volume of ``mask`` as a localization :class:`Case`."""
    from pipeline.localization.dataset import make_case
    from pipeline.synthesis.extend import truncated_labels

    labels, sub = mask.read()
    base = SynthOptions()
    options = replace(base, pose=replace(base.pose, spacing_mm=SYNTH_SPACING_MM))
    cut_in_source = set(truncated_labels(labels))
    case = synthesize(labels, rng, sub, options, mask.grades)
    present = set(case.centroids_mm)
    cut = (set(truncated_labels(case.labels)) | cut_in_source) & present
    return make_case(name, case.ct, case.centroids_mm, spacing_mm, cut)


def cached_synth_cases(root: Path, n: int, spacing_mm: float, cache_dir: Path, seed: int = 0,
                       log: Callable[[str], None] = lambda s: None) -> list:
    """``n`` synthesised cases from the train-side masks under ``root`` (round robin over the
    masks), each generated once and cached under ``cache_dir``."""
    from pipeline.localization.dataset import Case

    masks = find_masks(root, training_subjects())
    if not masks:
        raise ValueError(f"{root}: no vertebra mask of a training subject")
    out = []
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        mask = masks[k % len(masks)]
        path = cache_dir / f"synth-loc-{seed}-{k}-{spacing_mm:g}mm.npz"
        if not path.exists():
            rng = np.random.default_rng([seed, k])
            c = synth_case(mask, rng, spacing_mm, f"synth-{k}-{mask.subject}")
            tmp = path.with_name(path.name + ".tmp.npz")
            c.save(tmp)
            tmp.replace(path)
            log(f"synthesised case {k + 1}/{n} from {mask.labels.name}")
        out.append(Case.load(path))
    return out
