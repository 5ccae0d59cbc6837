"""``spine-node ... --help`` shows every help text whole: no word in square brackets taken for
rich markup and dropped (``configuration TOML ([pipeline] device)``), no command summary broken
where its docstring's source line ended. Runs the installed ``spine-node`` program."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer

from dicom_node.cli import app
from tests.helpers import REPO


def _commands(command, path=()):
    """(path, command) for the command and every visible subcommand below it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from _commands(sub, (*path, name))


ROOT = typer.main.get_command(app)
COMMANDS = list(_commands(ROOT))


def _flat(text: str) -> str:
    """Text with rich's box characters removed and all whitespace collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _plain(text: str) -> str:
    """A help text as the reader should see it (the CLI escapes ``[`` for rich)."""
    return _flat(text.replace("\\[", "["))


def _help(path: tuple[str, ...]) -> str:
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb"}
    res = subprocess.run([sys.executable, "-m", "dicom_node", *path, "--help"],
                         check=False, capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("path,command", COMMANDS,
                         ids=[" ".join(p) or "spine-node" for p, _ in COMMANDS])
def test_help_shows_every_help_text_whole(path, command):
    out = _help(path)
    flat = _flat(out)
    texts = [command.help.split("\n\n")[0]] if command.help else []
    texts += [p.help for p in command.params if getattr(p, "help", None)]
    for text in texts:
        assert _plain(text) in flat, f"{text!r} is not shown whole in:\n{out}"
    # A group lists each subcommand's summary on one line (the terminal is wide enough).
    lines = [_flat(line) for line in out.splitlines()]
    for name, sub in getattr(command, "commands", {}).items():
        if sub.hidden:
            continue
        summary = _plain((sub.short_help or sub.help or "").split("\n\n")[0])
        assert any(summary in line for line in lines), \
            f"{name}: {summary!r} is not on one line in:\n{out}"


def test_process_help_names_the_pipeline_section():
    assert "configuration TOML ([pipeline] device)" in _flat(_help(("process",)))
