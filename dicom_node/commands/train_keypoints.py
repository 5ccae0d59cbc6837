"""``spine-node train keypoints``: the 2D M-SCN of the Genant keypoints (paper section 2.3.3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dicom_node.commands import train_options as o
from pipeline.keypoints.train_config import KpTrainConfig as C


def register(train_app: typer.Typer) -> None:
    @train_app.command("keypoints")
    def keypoints(
        seeds: str = o.seeds_opt(C),
        val_seeds: str = o.val_seeds_opt(C),
        steps: int = o.steps_opt(C),
        batch: int = o.option(C, "batch", "Batch size."),
        lr: float = o.option(C, "lr", "Learning rate (Adam)."),
        base: int = o.option(C, "base", "Channels of the first LN level."),
        out: Path = o.out_opt(C),
        cache: Path = o.cache_opt(C, "planes"),
        time_limit_min: Optional[float] = o.time_limit_opt(),
        threads: int = o.threads_opt(C),
        seed: int = o.seed_opt(C),
        use_mask: bool = o.option(C, "use_mask", "Read the vertebra mask channel too, or the CT alone (as shipped).",
                                  "--use-mask/--ct-only"),
        init_from: Optional[Path] = typer.Option(None, help="Start from these weights (a best.pt): fine-tuning."),
        fracture_share: float = o.option(C, "fracture_share",
                                         help="Share of each batch drawn from fractured vertebrae."),
        real_data: Optional[Path] = o.real_data_opt(
            "; the six points are placed on each expert mask's body section"),
        real_repeat: int = o.option(C, "real_repeat", "Each real plane counts this many times.", min=1),
        synth_from: Optional[Path] = typer.Option(
            None, "--synth-from", exists=True, file_okay=False,
            help="Real vertebra masks (the real-spine pack: its train side) to synthesise CT "
                 "from (pipeline/synthesis: real anatomy, randomised appearance)."),
        synth_cases: int = o.option(C, "synth_cases", "Synthesised cases (cached).", min=1),
        val_synth_cases: int = o.option(
            C, "val_synth_cases", "Also validate on the planes of this many cases synthesised from "
                                  "--synth-from with --val-synth-seed (each group counts equally).", min=0),
        val_synth_seed: int = o.option(C, "val_synth_seed", "Seed of the synthesised validation cases."),
        install: bool = o.install_opt(),
    ) -> None:
        """Train the keypoint network: six heatmaps A1 A2 M1 M2 P1 P2 on the mid-sagittal plane."""
        from pipeline.keypoints.train import install as install_weights
        from pipeline.keypoints.train import train

        cfg = o.phantom_config(C, seeds=seeds, val_seeds=val_seeds, out=out, cache=cache,
                               time_limit_min=time_limit_min, steps=steps, batch=batch, lr=lr, base=base,
                               threads=threads, seed=seed, use_mask=use_mask,
                               init_from=str(init_from) if init_from else None, fracture_share=fracture_share,
                               real_data=str(real_data) if real_data else None, real_repeat=real_repeat,
                               synth_from=str(synth_from) if synth_from else None, synth_cases=synth_cases,
                               val_synth_cases=val_synth_cases, val_synth_seed=val_synth_seed)
        o.run_training(train, install_weights, cfg, install)

    @train_app.command("keypoint-planes")
    def keypoint_planes(
        seeds: str = typer.Argument(..., help="Phantom seeds, e.g. 140-151 (never 9001-9010)."),
        cache: Path = o.cache_opt(C, "planes"),
        slice_spacing: str = typer.Option(
            "", help="Comma-separated slice spacings (= thicknesses) in mm, cycled over the seeds."),
        auto: bool = typer.Option(False, "--auto",
                                  help="The seed's own random levels and fractures instead of the "
                                       "fracture specifications."),
    ) -> None:
        """Write extra keypoint training planes from phantoms with forced fractures (and thick
        slices) into the cache that `train keypoints` reads."""
        from pipeline.keypoints.fracture_phantoms import write_fracture_phantoms

        spacings = [float(v) for v in slice_spacing.split(",") if v.strip()]
        write_fracture_phantoms(o.seeds_option(seeds), cache, spacings, auto, log=typer.echo)
