"""``spine-node train keypoints``: the 2D M-SCN of the Genant keypoints (paper section 2.3.3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dicom_node.commands import train_options as o


def register(train_app: typer.Typer) -> None:
    @train_app.command("keypoints")
    def keypoints(
        seeds: str = o.seeds_opt(),
        val_seeds: str = o.val_seeds_opt(),
        steps: int = o.steps_opt(3000),
        batch: int = typer.Option(8, help="Batch size."),
        lr: float = typer.Option(1e-3, help="Learning rate (Adam)."),
        base: int = typer.Option(8, help="Channels of the first LN level."),
        out: Path = o.out_opt("runs/keypoints"),
        cache: Path = o.cache_opt("planes"),
        time_limit_min: Optional[float] = o.time_limit_opt(),
        threads: int = o.threads_opt(),
        seed: int = o.seed_opt(),
        use_mask: bool = typer.Option(True, "--use-mask/--ct-only", help="Read the mask channel, or the CT alone (shipped: --ct-only)."),
        init_from: Optional[Path] = typer.Option(None, help="Start from these weights (a best.pt): fine-tuning."),
        fracture_share: float = typer.Option(0.3, help="Share of each batch drawn from fractured vertebrae."),
        install: bool = o.install_opt(),
    ) -> None:
        """Train the keypoint network: six heatmaps A1 A2 M1 M2 P1 P2 on the mid-sagittal plane."""
        from pipeline.keypoints.train import install as install_weights, KpTrainConfig, train

        cfg = o.phantom_config(KpTrainConfig, seeds=seeds, val_seeds=val_seeds, out=out, cache=cache,
                               time_limit_min=time_limit_min, steps=steps, batch=batch, lr=lr, base=base,
                               threads=threads, seed=seed, use_mask=use_mask,
                               init_from=str(init_from) if init_from else None, fracture_share=fracture_share)
        o.run_training(train, install_weights, cfg, install)
