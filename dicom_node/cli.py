"""``spine-node``: the one entry point (DESIGN.md, "Command line", contract).

Each group of commands lives in its own module under :mod:`dicom_node.commands` and adds itself
to the app through ``register(app)``; this module only assembles them.
"""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="spine-node",
    help="DICOM node that finds and grades vertebral compression fractures on spine CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Command modules in the order their commands appear in ``--help``.
COMMAND_MODULES = (
    "serve",      # serve, worker
    "admin",      # studies, jobs, rerun, resend, echo, db upgrade
    "phantom",    # phantom
    "analysis",   # process, evaluate
    "train",      # train localization|segmentation|keypoints
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"dicom_node.commands.{_name}").register(app)


def main() -> None:
    app()
