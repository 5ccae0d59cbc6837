"""What a localization training run is given: :class:`TrainConfig`, the one source of the
defaults of ``spine-node train localization`` (no torch here: the CLI reads it at start-up)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass
class TrainConfig:
    out_dir: Path = Path("runs/localization")
    data: str = "phantom"                   # "phantom" or a VerSe-layout directory
    seeds: Sequence[int] = tuple(range(1, 201))
    val_seeds: Sequence[int] = (8001, 8002, 8003, 8004)
    cache_dir: Path | None = None           # default: out_dir/../cache
    spacing_mm: float = 4.0
    patch: Sequence[int] = (64, 48, 48)     # z, y, x voxels
    sigma_mm: float = 6.0
    amplitude: float = 1.0                  # peak of the target Gaussians
    fg_weight: float = 10.0                 # foreground weighting of the loss (0: the paper's)
    variant: str = "mscn"
    base: int = 8
    iterations: int = 2000
    batch: int = 2                          # paper: 4
    optimizer: str = "adam"                 # "adam" | "sgd" (paper)
    lr: float = 2e-3
    momentum: float = 0.99
    weight_decay: float = 5e-4
    clip: float = 2.0
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    schedule: str = "plateau"               # "plateau" (ReduceLROnPlateau) | "cosine" (to lr/100)
    val_every: int = 75
    log_every: int = 10
    seed: int = 0
    threads: int = 1
    workers: int = 1                        # processes that generate the missing phantom caches
    device: str = "cpu"                     # cpu | cuda | auto (bf16 autocast on a GPU)
    resume: bool = False
    reset_lr: bool = False                  # on resume, set the learning rate to ``lr`` (annealing)
    time_limit_s: float | None = None
    rotate_deg: float = 10.0
    overlap: float = 0.25
    init_from: str | None = None            # "shipped" or a best.pt: fine-tune from those weights
    real_data: str | None = None            # real CT (VerSe layout; the pack: its train side)
    real_repeat: int = 3                    # each real case counts this many times
    synth_real_dir: str | None = None       # real masks to synthesise CT from (pipeline.synthesis)
    synth_cases: int = 0                    # synthesised whole volumes (2 mm, cached)
    val_synth_cases: int = 0                # synthesised validation volumes (train-side masks)
    val_synth_seed: int = 1000              # their seed (not ``seed``: no training volume)
    relabel: bool | None = None             # meta "relabel" of the weights (None: inference's default)

    def jsonable(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        d["seeds"], d["val_seeds"], d["patch"] = list(self.seeds), list(self.val_seeds), list(self.patch)
        return d
