"""The operations guide and the conformance statement name things that exist: files of the
repository, configuration keys of the settings model, and commands of the CLI."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "operations.md", ROOT / "docs" / "conformance-statement.md"]
SECTIONS = {name for name, field in Settings.model_fields.items()}


def _text(path: Path) -> str:
    return path.read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_named_exists(doc):
    named = set(re.findall(r"(?<![\w/.])((?:deploy|docs|tests)/[\w./-]*\w)", _text(doc)))
    assert named, "the guide names the deploy files"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_configuration_key_named_exists(doc):
    keys = set(re.findall(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_]+)`", _text(doc)))
    keys |= set(re.findall(rf"(?<![\w.])((?:{'|'.join(SECTIONS - {'destinations'})})"
                           r"\.[a-z_]+_(?:s|mb|seconds|aes|hosts|pdu))\b", _text(doc)))
    assert keys
    unknown = []
    for key in sorted(keys):
        section, name = key.split(".")
        model = Settings.model_fields[section].annotation
        if section == "destinations" or not (isinstance(model, type)
                                            and issubclass(model, BaseModel)):
            continue
        if name not in model.model_fields:
            unknown.append(key)
    assert not unknown, f"{doc.name} names configuration keys that do not exist: {unknown}"


def test_every_command_in_the_guide_exists():
    from typer.main import get_command

    from dicom_node.cli import app

    cli = get_command(app)
    known = set(cli.commands)
    # Command lines only: at the start of a line or of inline code, after sudo or a venv's bin/,
    # or inside a container ("exec spine-node spine-node ...").
    used = set(re.findall(r"(?:^\s*|`|sudo |bin/|exec spine-node )spine-node ([a-z][a-z-]*)"
                          r"(?=\s|`|$)", _text(ROOT / "docs" / "operations.md"), re.MULTILINE))
    assert {"serve", "studies", "jobs", "echo", "db", "phantom", "resend"} <= used
    unknown = sorted(c for c in used if c not in known)
    assert not unknown, f"docs/operations.md uses commands the CLI lacks: {unknown}"
    assert "db" in known and "upgrade" in cli.commands["db"].commands
