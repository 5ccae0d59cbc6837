"""``spine-node train segmentation``: the per-vertebra 3D U-Net (paper section 2.3.1)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dicom_node.commands import train_options as o


def register(train_app: typer.Typer) -> None:
    @train_app.command("segmentation")
    def segmentation(
        seeds: str = o.seeds_opt(),
        val_seeds: str = o.val_seeds_opt(),
        steps: int = o.steps_opt(1500),
        batch: int = typer.Option(2, help="Batch size (paper: 4)."),
        optimizer: str = typer.Option("adam", help="adam | sgd (the paper's)."),
        lr: float = typer.Option(1e-3, help="Learning rate (paper: SGD 1e-4)."),
        base: int = typer.Option(8, help="Channels of the first U-Net level."),
        crop_size: int = typer.Option(64, help="Voxels per side of a crop (paper: 128)."),
        crop_spacing_mm: float = typer.Option(2.0, help="Spacing of the crops in mm (paper: 1)."),
        schedule: str = o.schedule_opt(),
        reset_lr: bool = o.reset_lr_opt(),
        init_from: Optional[str] = o.init_from_weights_opt("segmentation network"),
        real_data: Optional[Path] = o.real_data_opt(),
        real_fraction: float = typer.Option(0.5, min=0.0, max=1.0,
                                            help="Share of each batch drawn from --real-data."),
        synth_from: Optional[Path] = typer.Option(
            None, "--synth-from", exists=True, file_okay=False,
            help="Real vertebra masks (the real-spine pack: its train side) to synthesise CT "
                 "from (pipeline/synthesis: real anatomy, randomised appearance)."),
        synth_cases: int = typer.Option(200, min=1, help="Synthesised cases (cached)."),
        synth_fraction: float = typer.Option(0.0, min=0.0, max=1.0,
                                             help="Share of each batch drawn from --synth-from."),
        device: str = o.device_opt(),
        workers: int = o.workers_opt(),
        out: Path = o.out_opt("runs/segmentation"),
        cache: Path = o.cache_opt("crops"),
        time_limit_min: Optional[float] = o.time_limit_opt(),
        threads: int = o.threads_opt(),
        seed: int = o.seed_opt(),
        install: bool = o.install_opt(),
    ) -> None:
        """Train the segmentation network: background / normal / fractured vertebra."""
        from pipeline.segmentation.train import install as install_weights, SegTrainConfig, train

        cfg = o.phantom_config(SegTrainConfig, seeds=seeds, val_seeds=val_seeds, out=out, cache=cache,
                               time_limit_min=time_limit_min, steps=steps, batch=batch, optimizer=optimizer,
                               lr=lr, base=base, threads=threads, seed=seed, schedule=schedule,
                               reset_lr=reset_lr, init_from=str(init_from) if init_from else None,
                               device=device, workers=workers, crop_size=crop_size,
                               crop_spacing_mm=crop_spacing_mm,
                               real_data=str(real_data) if real_data else None,
                               real_fraction=real_fraction,
                               synth_real_dir=str(synth_from) if synth_from else None,
                               synth_cases=synth_cases, synth_fraction=synth_fraction)
        o.run_training(train, install_weights, cfg, install)
