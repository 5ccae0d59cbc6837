"""``spine-node train refiner``: the 1 mm boundary refiner of the segmentation
(:mod:`pipeline.segmentation.refine`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dicom_node.commands import train_options as o
from pipeline.segmentation.train_config import RefineTrainConfig as C


def register(train_app: typer.Typer) -> None:
    @train_app.command("refiner")
    def refiner(
        seeds: str = o.seeds_opt(C),
        val_seeds: str = o.val_seeds_opt(C),
        steps: int = o.steps_opt(C),
        batch: int = o.option(C, "batch", help="Batch size (patches at 1 mm)."),
        patch: int = o.option(C, "patch", help="Side of the training patches (1 mm voxels)."),
        lr: float = o.option(C, "lr", help="Learning rate (Adam)."),
        width: int = o.option(C, "width", help="Channels of the refiner's convolutions."),
        extra_dilations: str = o.option(C, "extra_dilations",
                                        help="Residual dilated layers after the first three, e.g. "
                                             "'4,8' (receptive field 9 -> 33 mm); with --init-from a refiner "
                                             "without them, they start at zero."),
        prior: str = o.option(C, "prior", help="The coarse prior it learns to correct: 'simulated' from "
                                  "the truth, or 'coarse', the 2 mm network's own output (a cascade)."),
        coarse_from: Optional[Path] = typer.Option(None, help="--prior coarse: a 2 mm network's best.pt "
                                                   "(default: the shipped one)."),
        schedule: str = o.schedule_opt(C, "as the segmentation"),
        reset_lr: bool = o.reset_lr_opt(C),
        init_from: Optional[str] = o.init_from_weights_opt("refiner"),
        real_data: Optional[Path] = o.real_data_opt(
            "; with --prior coarse, the 2 mm network's prior of each real crop"),
        real_repeat: int = o.option(C, "real_repeat", min=1, help="Each real crop counts this many times."),
        synth_from: Optional[Path] = typer.Option(
            None, "--synth-from", exists=True, file_okay=False,
            help="Real vertebra masks (the real-spine pack: its train side) to synthesise CT "
                 "from (pipeline/synthesis: real anatomy, randomised appearance)."),
        synth_cases: int = o.option(C, "synth_cases", min=1,
                                    help="Synthesised cases (up to two 1 mm crops each; cached)."),
        synth_exclude: str = o.option(C, "synth_exclude",
                                      help="Subjects (comma-separated) left out of the synthesis, "
                                           "to judge on them: bench/segmentation_synth.py --subjects."),
        device: str = o.device_opt(C),
        workers: int = o.workers_opt(C),
        out: Path = o.out_opt(C),
        cache: Path = o.cache_opt(C, "1 mm crops"),
        time_limit_min: Optional[float] = o.time_limit_opt(),
        threads: int = o.threads_opt(C),
        seed: int = o.seed_opt(C),
        install: bool = o.install_opt(),
    ) -> None:
        """Train the 1 mm boundary refiner (CT + the 2 mm network's prior -> foreground); --install
        puts it beside the shipped 2 mm segmentation network."""
        from pipeline.segmentation.train_refiner import install as install_weights
        from pipeline.segmentation.train_refiner import train

        cfg = o.phantom_config(C, seeds=seeds, val_seeds=val_seeds, out=out, cache=cache,
                               time_limit_min=time_limit_min, steps=steps, batch=batch, lr=lr,
                               width=width, schedule=schedule, patch=patch, extra_dilations=extra_dilations,
                               prior=prior, coarse_from=str(coarse_from) if coarse_from else None, reset_lr=reset_lr,
                               init_from=str(init_from) if init_from else None, threads=threads, seed=seed,
                               device=device, workers=workers,
                               real_data=str(real_data) if real_data else None, real_repeat=real_repeat,
                               synth_from=str(synth_from) if synth_from else None, synth_cases=synth_cases,
                               synth_exclude=synth_exclude)
        o.run_training(train, install_weights, cfg, install)
