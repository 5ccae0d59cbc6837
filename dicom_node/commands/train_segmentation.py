"""``spine-node train segmentation``: the per-vertebra 3D U-Net (paper section 2.3.1)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(train_app: typer.Typer) -> None:
    @train_app.command("segmentation")
    def segmentation(
        seeds: str = typer.Option("100-123", help="Phantom training seeds (never 9001-9010)."),
        val_seeds: str = typer.Option("8001-8002", help="Phantom validation seeds."),
        steps: int = typer.Option(1500, help="Training steps (batches)."),
        batch: int = typer.Option(2, help="Batch size (paper: 4)."),
        optimizer: str = typer.Option("adam", help="adam | sgd (the paper's)."),
        lr: float = typer.Option(1e-3, help="Learning rate (paper: SGD 1e-4)."),
        base: int = typer.Option(8, help="Channels of the first U-Net level."),
        out: Path = typer.Option(Path("runs/segmentation"), help="Run directory; resumes from its last.ckpt."),
        cache: Path = typer.Option(Path("runs/cache"), help="Cache of the phantom crops."),
        time_limit_min: Optional[float] = typer.Option(None, help="Stop (and validate) after this many minutes."),
        threads: int = typer.Option(1, help="torch CPU threads."),
        seed: int = typer.Option(0, help="Seed of initialisation and sampling."),
        install: bool = typer.Option(False, "--install", help="Install the best weights into pipeline/weights."),
    ) -> None:
        """Train the segmentation network: background / normal / fractured vertebra."""
        from dicom_node.commands.train import seeds_option
        from pipeline.segmentation.train import SegTrainConfig, install, train

        cfg = SegTrainConfig(out_dir=str(out), train_seeds=seeds_option(seeds), val_seeds=seeds_option(val_seeds),
                             cache_dir=str(cache), steps=steps, batch=batch, optimizer=optimizer, lr=lr,
                             base=base, threads=threads, seed=seed, max_minutes=time_limit_min)
        best = train(cfg, log=typer.echo)
        typer.echo(f"best weights: {best}")
        if install:
            typer.echo(f"installed {install(best)} (SHA-256 recorded in the manifest)")
