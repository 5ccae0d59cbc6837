"""``spine-node train segmentation``: the per-vertebra 3D U-Net (paper section 2.3.1)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dicom_node.commands import train_options as o
from pipeline.segmentation.train_config import SegTrainConfig as C


def register(train_app: typer.Typer) -> None:
    @train_app.command("segmentation")
    def segmentation(
        seeds: str = o.seeds_opt(C),
        val_seeds: str = o.val_seeds_opt(C),
        steps: int = o.steps_opt(C),
        batch: int = o.option(C, "batch", "Batch size (paper: 4)."),
        optimizer: str = o.option(C, "optimizer", "adam | sgd (the paper's)."),
        lr: float = o.option(C, "lr", "Learning rate (paper: SGD 1e-4)."),
        base: int = o.option(C, "base", "Channels of the first U-Net level."),
        crop_size: int = o.option(C, "crop_size", "Voxels per side of a crop (paper: 128)."),
        crop_spacing_mm: float = o.option(C, "crop_spacing_mm", "Spacing of the crops in mm (paper: 1)."),
        schedule: str = o.schedule_opt(C),
        reset_lr: bool = o.reset_lr_opt(C),
        init_from: Optional[str] = o.init_from_weights_opt("segmentation network"),
        real_data: Optional[Path] = o.real_data_opt(),
        real_fraction: float = o.option(C, "real_fraction", min=0.0, max=1.0,
                                            help="Share of each batch drawn from --real-data."),
        synth_from: Optional[Path] = typer.Option(
            None, "--synth-from", exists=True, file_okay=False,
            help="Real vertebra masks (the real-spine pack: its train side) to synthesise CT "
                 "from (pipeline/synthesis: real anatomy, randomised appearance)."),
        synth_cases: int = o.option(C, "synth_cases", "Synthesised cases (cached).", min=1),
        synth_fraction: float = o.option(C, "synth_fraction", min=0.0, max=1.0,
                                             help="Share of each batch drawn from --synth-from."),
        val_synth_cases: int = o.option(
            C, "val_synth_cases", "Also validate on crops of this many cases synthesised from "
                                  "--synth-from with --val-synth-seed (each group counts equally).", min=0),
        val_synth_seed: int = o.option(C, "val_synth_seed", "Seed of the synthesised validation cases."),
        device: str = o.device_opt(C),
        workers: int = o.workers_opt(C),
        out: Path = o.out_opt(C),
        cache: Path = o.cache_opt(C, "crops"),
        time_limit_min: Optional[float] = o.time_limit_opt(),
        threads: int = o.threads_opt(C),
        seed: int = o.seed_opt(C),
        install: bool = o.install_opt(),
    ) -> None:
        """Train the segmentation network: background / normal / fractured vertebra."""
        from pipeline.segmentation.train import install as install_weights
        from pipeline.segmentation.train import train

        cfg = o.phantom_config(C, seeds=seeds, val_seeds=val_seeds, out=out, cache=cache,
                               time_limit_min=time_limit_min, steps=steps, batch=batch, optimizer=optimizer,
                               lr=lr, base=base, threads=threads, seed=seed, schedule=schedule,
                               reset_lr=reset_lr, init_from=str(init_from) if init_from else None,
                               device=device, workers=workers, crop_size=crop_size,
                               crop_spacing_mm=crop_spacing_mm,
                               real_data=str(real_data) if real_data else None,
                               real_fraction=real_fraction,
                               synth_real_dir=str(synth_from) if synth_from else None,
                               synth_cases=synth_cases, synth_fraction=synth_fraction,
                               val_synth_cases=val_synth_cases, val_synth_seed=val_synth_seed)
        o.run_training(train, install_weights, cfg, install)
