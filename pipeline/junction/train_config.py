"""Options of the junction classifier's training (:func:`pipeline.junction.train.train`), apart
from the trainer so that the command line reads its defaults without importing torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JunctionTrainConfig:
    """Options of :func:`train` (the command's flags)."""

    data: str = "../shared/data/real-spine"
    synth_seed: int = 100
    synth_cases: int = 240
    #: Share of the synthesised volumes (training and validation) with contrast in the spinal
    #: canal (CT myelography).
    myelography: float = 0.0
    phantom_seeds: str = "1-40"
    real_subjects: str = "train"
    real_repeat: int = 30
    val_synth_seed: int = 200
    val_synth_cases: int = 40
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    width: int = 16
    positive_fraction: float = 0.35
    hard_fraction: float = 0.35
    val_every: int = 250
    out: str = "runs/junction"
    cache: str = "runs/junction-cache"
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
