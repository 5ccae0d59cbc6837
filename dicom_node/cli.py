"""``spine-node``: the one entry point (DESIGN.md, "Command line", contract).

Each group of commands lives in its own module under :mod:`dicom_node.commands` and adds itself
to the app through ``register(app)``; this module only assembles them.
"""
from __future__ import annotations

import importlib
import inspect
import re

import typer
from rich.markup import escape
from typer.core import TyperGroup


def _prose(text: str | None) -> str | None:
    """A help text as typer's rich formatting should get it: square brackets escaped (rich
    would take ``[pipeline]`` for a style and drop it) and the lines of each paragraph joined
    (in command lists rich keeps a docstring's line breaks, so a sentence broke in the middle
    wherever the source wrapped it)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(escape(re.sub(r"\s*\n\s*", " ", p).strip()) for p in paragraphs)


def _plain_help(command) -> None:
    """Apply :func:`_prose` to the help of ``command``, its parameters and its subcommands."""
    command.help = _prose(command.help)
    command.short_help = _prose(command.short_help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = _prose(param.help)
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)


class PlainHelpGroup(TyperGroup):
    """The root command: every help text in the tree is plain prose (:func:`_prose`), whether
    the app runs as ``spine-node``, ``python -m dicom_node`` or in a test's ``CliRunner``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _plain_help(self)


app = typer.Typer(
    name="spine-node",
    cls=PlainHelpGroup,
    help="DICOM node that finds and grades vertebral compression fractures on spine CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Command modules in the order their commands appear in ``--help``.
COMMAND_MODULES = (
    "serve",      # serve, worker
    "admin",      # studies, jobs, rerun, resend, echo, db upgrade
    "send",       # send
    "phantom",    # phantom
    "analysis",   # process, evaluate
    "train",      # train localization|segmentation|refiner|keypoints, keypoint-planes, calibrate-localization
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"dicom_node.commands.{_name}").register(app)


def main() -> None:
    app()
