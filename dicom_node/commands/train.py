"""``spine-node train localization|segmentation|keypoints``: train a model of the pipeline.

One typer sub-app, :data:`train_app`. This module defines ``localization``; the other models
add their subcommand from their own module: ``dicom_node/commands/train_<model>.py`` with a
``register(train_app)`` function, listed in :data:`TRAIN_MODULES` (a module not written yet is
skipped). Shared option parsing lives in :mod:`dicom_node.commands.train_options`.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from dicom_node.commands import train_options as o

train_app = typer.Typer(help="Train a model of the pipeline (phantom or VerSe data).", no_args_is_help=True)

#: Modules that add a ``train`` subcommand through ``register(train_app)``.
TRAIN_MODULES = ("train_segmentation", "train_refiner", "train_keypoints")


@train_app.command("localization")
def localization(
    data: str = typer.Option("phantom", help="'phantom' or a directory in VerSe layout."),
    seeds: str = typer.Option("1-200", help="Phantom training seeds (never 9001-9010)."),
    val_seeds: str = typer.Option("8001-8004", help="Phantom validation seeds."),
    iterations: int = typer.Option(2000, help="Training iterations (batches)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
    reset_lr: bool = typer.Option(False, "--reset-lr", help="With --resume: restart at --lr (annealing)."),
    out: Path = typer.Option(Path("runs/localization"), help="Run directory (checkpoints, log)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache of prepared phantom volumes (default: OUT/../cache)."),
    variant: str = typer.Option("mscn", help="mscn | scn | ln | gn | lngn (ablation arms)."),
    spacing_mm: float = typer.Option(4.0, help="Isotropic grid of the network (mm)."),
    patch: str = typer.Option("64,48,48", help="Training/inference patch z,y,x (voxels)."),
    batch: int = typer.Option(2, help="Batch size (paper: 4)."),
    optimizer: str = typer.Option("adam", help="adam | sgd (the paper's)."),
    lr: float = typer.Option(2e-3, help="Learning rate (paper: SGD 1e-4)."),
    schedule: str = typer.Option("plateau", help="plateau (the paper's ReduceLROnPlateau) | cosine (anneal to lr/100 by the last iteration or the time limit)."),
    base: int = typer.Option(8, help="Channels of the first LN level."),
    fg_weight: float = typer.Option(10.0, help="Foreground weight of the loss (0: the paper's plain Smooth-L1)."),
    val_every: int = typer.Option(75, help="Validate every N iterations."),
    time_limit_min: Optional[float] = typer.Option(None, help="Stop (and validate) after this many minutes."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    seed: int = typer.Option(0, help="Seed of initialisation and sampling."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto: where to train (bf16 autocast on a GPU)."),
    workers: int = o.workers_opt(),
    install: bool = typer.Option(False, "--install", help="Install the best weights into pipeline/weights."),
    init_from: Optional[str] = o.init_from_weights_opt("localization network"),
    real_data: Optional[Path] = o.real_data_opt(", added to the phantoms"),
    real_repeat: int = typer.Option(3, min=1, help="Each --real-data case counts this many times."),
    synth_from: Optional[Path] = typer.Option(
        None, "--synth-from", exists=True, file_okay=False,
        help="Real vertebra masks (the pack: its train side) to synthesise whole CT volumes from."),
    synth_cases: int = typer.Option(0, min=0, help="Volumes synthesised from --synth-from (cached)."),
    relabel: Optional[bool] = typer.Option(
        None, "--relabel/--no-relabel",
        help="Write into the weights whether inference relabels the found spine jointly "
             "(pipeline.localization.inference.relabel_on_path); default: inference's default."),
) -> None:
    """Train the M-SCN vertebra localisation network (paper section 2.2)."""
    from pipeline.localization.train import TrainConfig, train
    from pipeline.registry import install_weights

    cfg = TrainConfig(
        out_dir=out, cache_dir=cache_dir, data=data, seeds=o.seeds_option(seeds) if data == "phantom" else (),
        val_seeds=o.seeds_option(val_seeds) if data == "phantom" else (), iterations=iterations,
        resume=resume, reset_lr=reset_lr, variant=variant, spacing_mm=spacing_mm,
        patch=tuple(int(p) for p in patch.split(",")), batch=batch, optimizer=optimizer, lr=lr, schedule=schedule,
        base=base, fg_weight=fg_weight, val_every=val_every, threads=threads, seed=seed, device=device,
        workers=workers, time_limit_s=None if time_limit_min is None else 60 * time_limit_min,
        init_from=init_from, real_data=str(real_data) if real_data else None,
        real_repeat=real_repeat, synth_real_dir=str(synth_from) if synth_from else None,
        synth_cases=synth_cases, relabel=relabel)
    best = train(cfg, log=typer.echo)
    typer.echo(f"best weights: {best}")
    if install:
        dest = install_weights("localization", best)
        typer.echo(f"installed {dest} (SHA-256 recorded in the manifest)")


def register(app: typer.Typer) -> None:
    for name in TRAIN_MODULES:
        try:
            module = importlib.import_module(f"dicom_node.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dicom_node.commands.{name}":
                raise
            continue
        module.register(train_app)
    app.add_typer(train_app, name="train")
