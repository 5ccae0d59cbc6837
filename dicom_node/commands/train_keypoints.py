"""``spine-node train keypoints``: the 2D M-SCN of the Genant keypoints (paper section 2.3.3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(train_app: typer.Typer) -> None:
    @train_app.command("keypoints")
    def keypoints(
        seeds: str = typer.Option("100-123", help="Phantom training seeds (never 9001-9010)."),
        val_seeds: str = typer.Option("8001-8002", help="Phantom validation seeds."),
        steps: int = typer.Option(3000, help="Training steps (batches)."),
        batch: int = typer.Option(8, help="Batch size."),
        lr: float = typer.Option(1e-3, help="Learning rate (Adam)."),
        base: int = typer.Option(8, help="Channels of the first LN level."),
        out: Path = typer.Option(Path("runs/keypoints"), help="Run directory; resumes from its last.ckpt."),
        cache: Path = typer.Option(Path("runs/cache"), help="Cache of the phantom planes."),
        time_limit_min: Optional[float] = typer.Option(None, help="Stop (and validate) after this many minutes."),
        threads: int = typer.Option(1, help="torch CPU threads."),
        seed: int = typer.Option(0, help="Seed of initialisation and sampling."),
        use_mask: bool = typer.Option(True, "--use-mask/--ct-only", help="Read the mask channel, or the CT alone (shipped: --ct-only)."),
        init_from: Optional[Path] = typer.Option(None, help="Start from these weights (a best.pt): fine-tuning."),
        fracture_share: float = typer.Option(0.3, help="Share of each batch drawn from fractured vertebrae."),
        install: bool = typer.Option(False, "--install", help="Install the best weights into pipeline/weights."),
    ) -> None:
        """Train the keypoint network: six heatmaps A1 A2 M1 M2 P1 P2 on the mid-sagittal plane."""
        from dicom_node.commands.train import seeds_option
        from pipeline.keypoints.train import KpTrainConfig, install, train

        cfg = KpTrainConfig(out_dir=str(out), train_seeds=seeds_option(seeds), val_seeds=seeds_option(val_seeds),
                            cache_dir=str(cache), steps=steps, batch=batch, lr=lr, base=base, threads=threads,
                            seed=seed, max_minutes=time_limit_min, use_mask=use_mask,
                            init_from=str(init_from) if init_from else None, fracture_share=fracture_share)
        best = train(cfg, log=typer.echo)
        typer.echo(f"best weights: {best}")
        if install:
            typer.echo(f"installed {install(best)} (SHA-256 recorded in the manifest)")
