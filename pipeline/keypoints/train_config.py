"""What a keypoint training run is given: :class:`KpTrainConfig`, the one source of the
defaults of ``spine-node train keypoints`` (no torch here: the CLI reads it at start-up)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KpTrainConfig:
    out_dir: str = "runs/keypoints"
    train_seeds: list[int] = field(default_factory=lambda: list(range(100, 124)))
    val_seeds: list[int] = field(default_factory=lambda: [8001, 8002])
    cache_dir: str = "runs/cache"
    phantom_spacing_mm: float | None = None
    steps: int = 3000
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 5e-4
    clip: float = 2.0
    base: int = 8
    depth: int = 4
    sigma_px: float = 2.0
    amplitude: float = 10.0
    seed: int = 0
    threads: int = 1
    val_every: int = 200
    ckpt_every: int = 100
    max_minutes: float | None = None
    fracture_share: float = 0.3          # share of each batch drawn from fractured vertebrae
    init_from: str | None = None         # start from these weights (a best.pt), e.g. to fine-tune
    use_mask: bool = False               # True: read the vertebra mask channel too (shipped: CT only)
    real_data: str | None = None         # real CT in VerSe layout (the pack: its train side)
    real_repeat: int = 3                 # each real plane counts this many times in the draw
    real_aug: int = 6                    # jittered planes per real vertebra (the first unjittered)
    synth_from: str | None = None        # real masks to synthesise CT from (pipeline.synthesis)
    synth_cases: int = 60                # synthesised cases (up to 3 vertebrae each), cached
    val_synth_cases: int = 0             # synthesised validation cases (train-side masks)
    val_synth_seed: int = 1000           # their seed (not ``seed``: no training plane)
