"""``spine-node send``: C-STORE a folder of DICOM files to a node (this one by default).

A sender that is always there once the project is installed, whichever ``storescu`` comes first
on PATH (the virtual environment puts pynetdicom's, whose options differ from dcmtk's, before
``/usr/bin/storescu``). It is the exporter's own SCU (:func:`dicom_node.scu.store_files`): one
association, one presentation context per SOP class offering each file's transfer syntax.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from dicom_node.commands.admin import PEER_RE  # AE@HOST:PORT, as `echo` takes it
from dicom_node.context import CONFIG_OPTION, settings_or_exit


def send(paths: list[Path] = typer.Argument(..., exists=True, metavar="PATH",
                                            help="DICOM files, or folders searched recursively "
                                                 "(e.g. the dicom/ folder of `spine-node "
                                                 "phantom`)"),
         to: str = typer.Option(None, "--to", metavar="AE@HOST:PORT",
                                help="the receiver (default: this node, node.ae_title at "
                                     "127.0.0.1 on node.port)"),
         aet: str = typer.Option("STORESCU", "--aet", help="our (calling) AE title"),
         config: Path = CONFIG_OPTION) -> None:
    """Send DICOM files to a DICOM node (by default this one) over one association."""
    from dicom_node.commands.analysis import dicom_files
    from dicom_node.scu import Peer, StoreError, store_files

    if to is None:
        node = settings_or_exit(config).node
        host = "127.0.0.1" if node.host in ("0.0.0.0", "::", "") else node.host
        peer = Peer(ae_title=node.ae_title, host=host, port=node.port)
    else:
        m = PEER_RE.match(to)
        if not m or not 0 < int(m["port"]) < 65536:
            raise typer.BadParameter(f"{to!r} is not AE@HOST:PORT", param_hint="--to")
        peer = Peer(ae_title=m["ae"], host=m["host"].strip("[]"), port=int(m["port"]))
    files: list[Path] = []
    for path in paths:
        files += dicom_files(path) if path.is_dir() else [path]
    if not files:
        raise typer.BadParameter("no DICOM files there", param_hint="PATH")
    start = time.perf_counter()
    try:
        outcomes = store_files(files, peer, calling_ae=aet)
    except StoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (OSError, ValueError, AttributeError) as exc:  # unreadable file, no File Meta, ...
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    seconds = time.perf_counter() - start
    failed = [o for o in outcomes if not o.ok]
    for o in failed[:10]:
        typer.echo(f"failed: {o.path}: {o.error}", err=True)
    if len(failed) > 10:
        typer.echo(f"failed: ... and {len(failed) - 10} more", err=True)
    typer.echo(f"sent {len(outcomes) - len(failed)} of {len(outcomes)} instances to {peer} in "
               f"{seconds:.1f} s")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("send")(send)
