"""The subject-level split of the real-spine pack (``split.json`` beside this module).

Written once and used by every trainer, every calibration and every reported figure: training
and threshold choices see only ``train``; the model card's real-data figures come only from
``validation``. A subject's scans (every session) are on one side (the pack's README: split by
subject, never by vertebra or scan date).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPLIT_FILE = Path(__file__).with_name("split.json")


@dataclass(frozen=True)
class Split:
    """Subjects on each side of the split."""

    train: tuple[str, ...]
    validation: tuple[str, ...]

    def side(self, name: str) -> tuple[str, ...]:
        if name not in ("train", "validation"):
            raise ValueError(f"unknown split side {name!r} (train | validation)")
        return self.train if name == "train" else self.validation

    def side_of(self, subject: str) -> str | None:
        if subject in self.train:
            return "train"
        if subject in self.validation:
            return "validation"
        return None


def load_split(path: Path = SPLIT_FILE) -> Split:
    """Read and check a split file: no subject on both sides, none twice."""
    data = json.loads(Path(path).read_text())
    train, val = tuple(data["train"]), tuple(data["validation"])
    both = sorted(set(train) & set(val))
    if both:
        raise ValueError(f"{path}: subjects on both sides of the split: {', '.join(both)}")
    for name, side in (("train", train), ("validation", val)):
        if len(set(side)) != len(side):
            raise ValueError(f"{path}: a subject is listed twice in {name}")
    return Split(train=train, validation=val)
