"""``spine-node phantom``: write a synthetic spine CT study with exact ground truth (DESIGN.md, contract)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer


def phantom(
    seed: int = typer.Option(..., "--seed", help="Seed: the same seed gives identical output."),
    out: Path = typer.Option(..., "--out", help="Output folder (created)."),
    levels: Optional[str] = typer.Option(
        None, "--levels", help="Covered levels, e.g. T8-L5 (default: 5-17 random contiguous levels)."),
    fractures: str = typer.Option("auto", "--fractures", help="auto (0-3), none, or e.g. L1:2:wedge,T12:1:biconcave."),
    preview: bool = typer.Option(
        False, "--preview",
        help="Also write DIR/preview.png (mid-sagittal and coronal, bone window, label outlines)."),
    spacing_mm: Optional[float] = typer.Option(
        None, "--spacing-mm", help="Isotropic grid of this spacing instead of the seed's acquisition grid."),
) -> None:
    """Write DIR/dicom/ (one CT file per slice), DIR/labels.nii.gz, DIR/gt.json and DIR/verse/."""
    from pipeline.levels import level_range
    from pipeline.phantom import generate, write_study
    from pipeline.phantom.fractures import parse_fractures

    try:
        if levels:
            level_range(levels)
        parse_fractures(fractures)
    except KeyError as exc:
        raise typer.BadParameter(f"unknown level {exc}") from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    t0 = time.perf_counter()
    try:
        ph = generate(seed, levels=levels, fractures=fractures, spacing_mm=spacing_mm)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    t1 = time.perf_counter()
    write_study(ph, out, preview=preview)
    t2 = time.perf_counter()
    nx, ny, nz = ph.ct.GetSize()
    frac = [f"{v['name']}:{v['genant_grade']}:{v['morphology']}" for v in ph.gt["vertebrae"] if v["fractured"]]
    typer.echo(f"phantom seed {seed}: {nx}x{ny}x{nz} voxels, levels {ph.gt['levels'][0]}-{ph.gt['levels'][-1]}, "
               f"fractures {', '.join(frac) or 'none'}")
    typer.echo(f"written to {out} (generate {t1 - t0:.1f} s, write {t2 - t1:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("phantom")(phantom)
