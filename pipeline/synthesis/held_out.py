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


def held_out_volumes(data: Path, subjects: Sequence[str] | None, seed: int, reps: int = 1,
                     options: SynthOptions | None = None) -> Iterator[HeldOutVolume]:
    """``reps`` volumes per mask of ``subjects`` (:func:`train_side`) under ``data``, each from
    its own generator ``[seed, mask index, rep]``, synthesised as they are iterated with
    ``options`` (default :class:`SynthOptions`). ``ValueError`` at once for seed 0 or a subject
    off the train side."""
    if seed == 0:
        raise ValueError("seed 0 synthesises the training crops; choose another")
    return _volumes(find_masks(data, train_side(subjects)), seed, reps, options or SynthOptions())


def add_volume_options(ap, data_default: Path) -> None:
    """The benches' options that choose the held-out volumes: ``--data``, ``--subjects``,
    ``--seed``, ``--reps``, ``--myelography`` (an :class:`argparse.ArgumentParser`)."""
    ap.add_argument("--data", type=Path, default=data_default)
    ap.add_argument("--subjects", help="train-side subjects separated by commas (default: all)")
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--myelography", type=float,
                    help="share of volumes with contrast in the spinal canal (default: the "
                         "synthesis default, SceneOptions.myelography)")


def options_of(a) -> SynthOptions:
    """The synthesis options of parsed :func:`add_volume_options`: the defaults, with
    ``--myelography`` where given."""
    base = SynthOptions()
    return base if a.myelography is None else base.with_scene(myelography=a.myelography)


def volumes_of_options(ap, a) -> Iterator[HeldOutVolume]:
    """:func:`held_out_volumes` of the options :func:`add_volume_options` added (parsed as
    ``a``); a refused seed or subject is the parser's error."""
    try:
        return held_out_volumes(a.data, a.subjects.split(",") if a.subjects else None, a.seed,
                                a.reps, options_of(a))
    except ValueError as e:
        ap.error(str(e))


def _volumes(masks, seed: int, reps: int, options: SynthOptions) -> Iterator[HeldOutVolume]:
    from pipeline.synthesis.extend import truncated_labels

    for mi, mask in enumerate(masks):
        labels, sub = mask.read()
        cut_in_source = set(truncated_labels(labels))
        for r in range(reps):
            rng = np.random.default_rng([seed, mi, r])
            case = synthesize(labels, rng, sub, options, mask.grades)
            yield HeldOutVolume(case, set(truncated_labels(case.labels)) | cut_in_source, rng)
