"""``spine-node train ...``: train a model of the pipeline (localization, segmentation, refiner,
keypoints, junction), write extra keypoint planes, calibrate a localization weight file.

One typer sub-app, :data:`train_app`. This module defines ``localization``; the other models
add their subcommand from their own module: ``dicom_node/commands/train_<model>.py`` with a
``register(train_app)`` function, listed in :data:`TRAIN_MODULES`. Shared option parsing lives
in :mod:`dicom_node.commands.train_options`.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from dicom_node.commands import train_options as o
from pipeline.localization.train_config import TrainConfig as C

train_app = typer.Typer(help="Train a model of the pipeline (phantom or VerSe data).", no_args_is_help=True)

#: Modules that add a ``train`` subcommand through ``register(train_app)``.
TRAIN_MODULES = ("train_segmentation", "train_refiner", "train_keypoints", "train_junction")


@train_app.command("localization")
def localization(
    data: str = o.option(C, "data", help="'phantom' or a directory in VerSe layout."),
    seeds: str = o.seeds_opt(C, "seeds"),
    val_seeds: str = o.val_seeds_opt(C),
    iterations: int = o.option(C, "iterations", help="Training iterations (batches)."),
    resume: bool = o.option(C, "resume", "Continue from OUT/last.pt.", "--resume"),
    reset_lr: bool = o.option(C, "reset_lr", "With --resume: restart at --lr (annealing).", "--reset-lr"),
    out: Path = o.option(C, "out_dir", "Run directory (checkpoints, log).", "--out"),
    cache_dir: Optional[Path] = o.option(C, "cache_dir", "Cache of prepared phantom volumes (default: OUT/../cache)."),
    variant: str = o.option(C, "variant", "mscn | scn | ln | gn | lngn (ablation arms)."),
    spacing_mm: float = o.option(C, "spacing_mm", "Isotropic grid of the network (mm)."),
    patch: str = typer.Option(",".join(str(p) for p in o.config_default(C, "patch")),
                              help="Training/inference patch z,y,x (voxels)."),
    batch: int = o.option(C, "batch", "Batch size (paper: 4)."),
    optimizer: str = o.option(C, "optimizer", "adam | sgd (the paper's)."),
    lr: float = o.option(C, "lr", "Learning rate (paper: SGD 1e-4)."),
    schedule: str = o.option(C, "schedule", "plateau (the paper's ReduceLROnPlateau) | cosine (anneal to lr/100 "
                                             "by the last iteration or the time limit)."),
    base: int = o.option(C, "base", "Channels of the first LN level."),
    fg_weight: float = o.option(C, "fg_weight", "Foreground weight of the loss (0: the paper's plain Smooth-L1)."),
    val_every: int = o.option(C, "val_every", "Validate every N iterations."),
    time_limit_min: Optional[float] = o.time_limit_opt(),
    threads: int = o.threads_opt(C),
    seed: int = o.seed_opt(C),
    device: str = o.device_opt(C),
    workers: int = o.workers_opt(C),
    install: bool = o.install_opt(),
    init_from: Optional[str] = o.init_from_weights_opt("localization network"),
    real_data: Optional[Path] = o.real_data_opt(", added to the phantoms"),
    real_repeat: int = o.option(C, "real_repeat", "Each --real-data case counts this many times.", min=1),
    synth_from: Optional[Path] = typer.Option(
        None, "--synth-from", exists=True, file_okay=False,
        help="Real vertebra masks (the pack: its train side) to synthesise whole CT volumes from."),
    synth_cases: int = o.option(C, "synth_cases", "Volumes synthesised from --synth-from (cached).", min=0),
    val_synth_cases: int = o.option(
        C, "val_synth_cases", "Also validate on this many volumes synthesised from --synth-from with "
                              "--val-synth-seed (each group's score counts equally).", min=0),
    val_synth_seed: int = o.option(C, "val_synth_seed", "Seed of the synthesised validation volumes."),
    relabel: Optional[bool] = typer.Option(
        None, "--relabel/--no-relabel",
        help="Write into the weights whether inference relabels the found spine jointly "
             "(pipeline.localization.infer.relabel_on_path); default: inference's default."),
) -> None:
    """Train the M-SCN vertebra localisation network (paper section 2.2)."""
    from pipeline.localization.train import train
    from pipeline.registry import install_weights

    cfg = C(
        out_dir=out, cache_dir=cache_dir, data=data, seeds=o.seeds_option(seeds) if data == "phantom" else (),
        val_seeds=o.seeds_option(val_seeds) if data == "phantom" else (), iterations=iterations,
        resume=resume, reset_lr=reset_lr, variant=variant, spacing_mm=spacing_mm,
        patch=tuple(int(p) for p in patch.split(",")), batch=batch, optimizer=optimizer, lr=lr, schedule=schedule,
        base=base, fg_weight=fg_weight, val_every=val_every, threads=threads, seed=seed, device=device,
        workers=workers, time_limit_s=None if time_limit_min is None else 60 * time_limit_min,
        init_from=init_from, real_data=str(real_data) if real_data else None,
        real_repeat=real_repeat, synth_real_dir=str(synth_from) if synth_from else None,
        synth_cases=synth_cases, val_synth_cases=val_synth_cases, val_synth_seed=val_synth_seed,
        relabel=relabel)
    best = train(cfg, log=typer.echo)
    typer.echo(f"best weights: {best}")
    if install:
        dest = install_weights("localization", best)
        typer.echo(f"installed {dest} (SHA-256 recorded in the manifest)")


def register(app: typer.Typer) -> None:
    for name in TRAIN_MODULES:
        importlib.import_module(f"dicom_node.commands.{name}").register(train_app)
    app.add_typer(train_app, name="train")


@train_app.command("calibrate-localization")
def calibrate_localization(
    weights: Path = typer.Argument(..., exists=True, dir_okay=False, help="A localization best.pt."),
    out: Path = typer.Option(..., "--out", help="Where to write the calibrated weights."),
    val_seeds: str = o.val_seeds_opt(C),
    cache_dir: Path = typer.Option(Path("runs/localization/cache"), help="Cache of prepared phantom volumes."),
    overlap: Optional[float] = typer.Option(None, help="Patch overlap of inference (default: the file's)."),
    threads: int = o.threads_opt(C),
) -> None:
    """Choose a localization weight file's decoder and presence threshold on validation phantoms
    and write them into its meta."""
    import json

    import torch

    from pipeline.localization.calibrate import calibrate

    torch.set_num_threads(threads)
    typer.echo(json.dumps(calibrate(weights, o.seeds_option(val_seeds), cache_dir, out, overlap)))

