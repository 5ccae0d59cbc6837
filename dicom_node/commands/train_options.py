"""Options and run/install steps shared by the ``spine-node train`` commands.

Every default comes from the trainer's config dataclass (:func:`config_default`; the
``train_config`` modules of :mod:`pipeline`, which import no torch): the command line adds only
the help text. :func:`phantom_config` maps the shared options onto a trainer's config and
:func:`run_training` trains, reports the best checkpoint and optionally installs it.
"""
from __future__ import annotations

from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer


def config_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``cls`` (its factory's value)."""
    f = cls.__dataclass_fields__[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


def seeds_text(seeds: Sequence[int]) -> str:
    """``[100, ..., 123]`` -> ``"100-123"``; ``[1, 3, 4, 5]`` -> ``"1,3-5"`` (what
    :func:`seeds_option` reads back)."""
    out: list[str] = []
    values = sorted(int(s) for s in seeds)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


def option(cls: type, name: str, help: str, *decls: str, **kw: Any) -> Any:
    """A ``typer.Option`` whose default is ``cls``'s for field ``name`` (seeds as text)."""
    value = config_default(cls, name)
    if name.endswith("seeds"):
        value = seeds_text(value)
    return typer.Option(value, *decls, help=help, **kw)


def seeds_opt(cls: type, name: str = "train_seeds") -> Any:
    return option(cls, name, "Phantom training seeds (never 9001-9010).")


def val_seeds_opt(cls: type) -> Any:
    return option(cls, "val_seeds", "Phantom validation seeds.")


def steps_opt(cls: type) -> Any:
    return option(cls, "steps", "Training steps (batches).")


def out_opt(cls: type) -> Any:
    return option(cls, "out_dir", "Run directory; resumes from its last.ckpt.", "--out")


def cache_opt(cls: type, what: str) -> Any:
    return option(cls, "cache_dir", f"Cache of the phantom {what}.", "--cache")


def time_limit_opt() -> Any:
    return typer.Option(None, help="Stop (and validate) after this many minutes.")


def threads_opt(cls: type) -> Any:
    return option(cls, "threads", "torch CPU threads.")


def seed_opt(cls: type) -> Any:
    return option(cls, "seed", "Seed of initialisation and sampling.")


def device_opt(cls: type) -> Any:
    return option(cls, "device", "cpu | cuda | auto: where to train (bf16 autocast on a GPU).")


def workers_opt(cls: type) -> Any:
    return option(cls, "workers", "Processes that generate the missing phantom caches.")


def schedule_opt(cls: type, paper: str = "the paper's") -> Any:
    return option(cls, "schedule", f"plateau ({paper}) | cosine (to lr/100 over the run).")


def reset_lr_opt(cls: type) -> Any:
    return option(cls, "reset_lr", "On resume, restart the learning rate at --lr.", "--reset-lr")


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
