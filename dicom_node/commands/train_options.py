"""Options and run/install steps shared by ``spine-node train segmentation|keypoints``.

Each factory returns a fresh ``typer.Option`` (same default and help in both commands);
:func:`phantom_config` maps the shared options onto a trainer's config dataclass and
:func:`run_training` trains, reports the best checkpoint and optionally installs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer


def seeds_opt() -> Any:
    return typer.Option("100-123", help="Phantom training seeds (never 9001-9010).")


def val_seeds_opt() -> Any:
    return typer.Option("8001-8002", help="Phantom validation seeds.")


def steps_opt(default: int) -> Any:
    return typer.Option(default, help="Training steps (batches).")


def out_opt(default: str) -> Any:
    return typer.Option(Path(default), help="Run directory; resumes from its last.ckpt.")


def cache_opt(what: str) -> Any:
    return typer.Option(Path("runs/cache"), help=f"Cache of the phantom {what}.")


def time_limit_opt() -> Any:
    return typer.Option(None, help="Stop (and validate) after this many minutes.")


def threads_opt() -> Any:
    return typer.Option(1, help="torch CPU threads.")


def seed_opt() -> Any:
    return typer.Option(0, help="Seed of initialisation and sampling.")


def device_opt() -> Any:
    return typer.Option("cpu", help="cpu | cuda | auto: where to train (bf16 autocast on a GPU).")


def workers_opt() -> Any:
    return typer.Option(1, help="Processes that generate the missing phantom caches.")


def schedule_opt(paper: str = "the paper's") -> Any:
    return typer.Option("plateau", help=f"plateau ({paper}) | cosine (to lr/100 over the run).")


def reset_lr_opt() -> Any:
    return typer.Option(False, "--reset-lr", help="On resume, restart the learning rate at --lr.")


def init_from_weights_opt(what: str) -> Any:
    return typer.Option(None, "--init-from",
                        help=f"Start from these weights: a {what} best.pt of a run, or 'shipped' "
                             "(the installed one, e.g. to fine-tune it on real CT); ignored when "
                             "the run resumes.")


def real_data_opt(extra: str = "") -> Any:
    return typer.Option(None, "--real-data", exists=True, file_okay=False,
                        help="Real CT with vertebra masks in VerSe layout (the real-spine pack: "
                             "only its train side of pipeline/realdata/split.json)" + extra + ".")


def install_opt() -> Any:
    return typer.Option(False, "--install", help="Install the best weights into pipeline/weights.")


def phantom_config(cls: type, *, seeds: str, val_seeds: str, out: Path, cache: Path,
                   time_limit_min: Optional[float], **fields: Any) -> Any:
    """``cls(out_dir, train_seeds, val_seeds, cache_dir, max_minutes, **fields)`` from the CLI values."""
    return cls(out_dir=str(out), train_seeds=seeds_option(seeds), val_seeds=seeds_option(val_seeds),
               cache_dir=str(cache), max_minutes=time_limit_min, **fields)


def run_training(train: Callable[..., Path], install: Callable[[Path], Path], cfg: Any, do_install: bool) -> None:
    """Train (progress to the terminal), print the best checkpoint, install it if asked."""
    best = train(cfg, log=typer.echo)
    typer.echo(f"best weights: {best}")
    if do_install:
        typer.echo(f"installed {install(best)} (SHA-256 recorded in the manifest)")


def seeds_option(spec: str) -> list[int]:
    """``"1-40"`` / ``"1,3,5-9"`` -> seeds; refuses the evaluation seeds (:mod:`pipeline.seeds`)."""
    from pipeline.evaluate import parse_seeds
    from pipeline.seeds import refuse_evaluation_seeds

    seeds = parse_seeds(spec)
    try:
        refuse_evaluation_seeds(seeds)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return seeds
