"""What a segmentation or refiner training run is given: :class:`SegTrainConfig` and
:class:`RefineTrainConfig`, the one source of the defaults of ``spine-node train segmentation``
and ``spine-node train refiner`` (no torch here: the CLI reads them at start-up)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.segmentation.crops import CROP_SIZE, CROP_SPACING_MM


@dataclass
class SegTrainConfig:
    out_dir: str = "runs/segmentation"
    train_seeds: list[int] = field(default_factory=lambda: list(range(100, 124)))
    val_seeds: list[int] = field(default_factory=lambda: [8001, 8002])
    cache_dir: str = "runs/cache"
    phantom_spacing_mm: float | None = None   # None: the phantom's randomised acquisition grid
    steps: int = 1500
    batch: int = 2
    lr: float = 1e-3
    optimizer: str = "adam"                   # adam | sgd (paper: sgd, lr 1e-4)
    weight_decay: float = 5e-4
    clip: float = 2.0
    base: int = 8
    depth: int = 4
    seed: int = 0
    threads: int = 1
    val_every: int = 100
    ckpt_every: int = 50
    max_minutes: float | None = None
    schedule: str = "plateau"                 # plateau (the paper's) | cosine (to lr/100 over the run)
    reset_lr: bool = False                    # on resume, restart from ``lr`` (a new annealing)
    init_from: str | None = None              # a best.pt of this network to start from (fine-tuning)
    device: str = "cpu"                       # cpu | cuda | auto (bf16 autocast on a GPU)
    workers: int = 1                          # processes that generate the missing phantom caches
    crop_size: int = CROP_SIZE                # voxels per side of a crop (paper: 128)
    crop_spacing_mm: float = CROP_SPACING_MM  # their spacing (paper: 1 mm; shipped: 64 at 2 mm)
    real_data: str | None = None              # real CT in VerSe layout (the pack: its train side)
    real_fraction: float = 0.5                # share of each batch's crops drawn from real_data
    synth_real_dir: str | None = None         # real masks to synthesise CT from (pipeline.synthesis)
    synth_cases: int = 200                    # synthesised cases (2 crops each), cached
    synth_fraction: float = 0.0               # share of each batch's crops drawn from them
    val_synth_cases: int = 0                  # synthesised validation cases (train-side masks)
    val_synth_seed: int = 1000                # their seed (not ``seed``: no training crop)


@dataclass
class RefineTrainConfig:
    out_dir: str = "runs/refiner"
    train_seeds: list[int] = field(default_factory=lambda: list(range(100, 124)))
    val_seeds: list[int] = field(default_factory=lambda: [8001, 8002])
    cache_dir: str = "runs/cache"
    steps: int = 1500
    batch: int = 4
    lr: float = 2e-3
    weight_decay: float = 5e-4
    clip: float = 2.0
    width: int = 8
    seed: int = 0
    threads: int = 1
    val_every: int = 100
    ckpt_every: int = 50
    max_minutes: float | None = None
    schedule: str = "plateau"                 # plateau | cosine (to lr/100 over the run)
    reset_lr: bool = False                    # on resume, restart from ``lr``
    init_from: str | None = None              # a refiner best.pt to start from (fine-tuning)
    device: str = "cpu"                       # cpu | cuda | auto (bf16 autocast on a GPU)
    workers: int = 1                          # processes that generate the missing phantom caches
    prior: str = "simulated"                  # simulated | coarse (the 2 mm network's output)
    coarse_from: str | None = None            # prior=coarse: a 2 mm network's best.pt (default: shipped)
    extra_dilations: str = ""                 # e.g. "4,8": residual dilated layers (ShallowRefiner)
    patch: int = 40                           # side of the training patches (1 mm voxels)
    real_data: str | None = None              # real CT in VerSe layout (the pack: its train side)
    real_repeat: int = 4                      # each real crop counts this many times
    synth_from: str | None = None             # real masks to synthesise CT from (pipeline.synthesis)
    synth_cases: int = 100                    # synthesised cases (up to 2 crops each), cached
    synth_exclude: str = ""                   # subjects left out of the synthesis (held out for a bench)
