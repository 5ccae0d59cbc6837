"""Which data may train, calibrate or evaluate: the one place that says so.

- Phantom seeds 9001-9010 (:data:`EVALUATION_SEEDS`) are the phantom test set: no trainer,
  calibration or threshold choice may use them (:func:`refuse_evaluation_seeds`).
- Real subjects: the subject-level split of the real-spine pack (:mod:`pipeline.realdata.split`,
  ``split.json``): trainers read its ``train`` side, reported figures its ``validation`` side.
"""
from __future__ import annotations

from collections.abc import Iterable

#: Phantom seeds of the test set (DESIGN.md, ``spine-node evaluate --seeds 9001-9010``).
EVALUATION_SEEDS = range(9001, 9011)


def refuse_evaluation_seeds(seeds: Iterable[int], what: str = "training") -> None:
    """Raise ``ValueError`` naming the seeds of ``seeds`` that belong to the test set."""
    bad = sorted(set(int(s) for s in seeds) & set(EVALUATION_SEEDS))
    if bad:
        raise ValueError(f"seeds {bad} are evaluation seeds (9001-9010): not for {what}")
