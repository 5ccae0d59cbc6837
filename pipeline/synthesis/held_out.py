"""Whole volumes synthesised from the train side's real masks with seeds of their own, for the
benchmarks that choose settings without the validation subjects (``bench/segmentation_synth.py``,
``bench/grading_synth.py``): default synthesis options (random pose, fractures of known grade, the
masks' rated fractures kept, randomised appearance), seed 0 refused (the training caches')."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.synthesis.generate import SynthCase, SynthOptions, synthesize
from pipeline.synthesis.seg_source import find_masks, training_subjects


class HeldOutVolume(NamedTuple):
    """One synthesised volume, the labels cut by its field of view or by the source scan (not
    whole: neither scored nor required), and its random generator (drawn on after synthesis)."""

    case: SynthCase
    cut: set[int]
    rng: np.random.Generator


def train_side(subjects: Sequence[str] | None = None) -> list[str]:
    """``subjects`` (default: the whole train side of the split); ``ValueError`` naming any that
    is not on the train side."""
    train = training_subjects()
    if subjects is None:
        return train
    outside = sorted(set(subjects) - set(train))
    if outside:
        raise ValueError(f"not on the train side of the split: {', '.join(outside)}")
    return list(subjects)


def held_out_volumes(data: Path, subjects: Sequence[str] | None, seed: int, reps: int = 1
                     ) -> Iterator[HeldOutVolume]:
    """``reps`` volumes per mask of ``subjects`` (:func:`train_side`) under ``data``, each from
    its own generator ``[seed, mask index, rep]``, synthesised as they are iterated.
    ``ValueError`` at once for seed 0 or a subject off the train side."""
    if seed == 0:
        raise ValueError("seed 0 synthesises the training crops; choose another")
    return _volumes(find_masks(data, train_side(subjects)), seed, reps)


def _volumes(masks, seed: int, reps: int) -> Iterator[HeldOutVolume]:
    from pipeline.synthesis.extend import truncated_labels

    for mi, mask in enumerate(masks):
        labels, sub = mask.read()
        cut_in_source = set(truncated_labels(labels))
        for r in range(reps):
            rng = np.random.default_rng([seed, mi, r])
            case = synthesize(labels, rng, sub, SynthOptions(), mask.grades)
            yield HeldOutVolume(case, set(truncated_labels(case.labels)) | cut_in_source, rng)
