"""What every command works with: the settings, the database, the index, the job queue and
the blob store, built the same way everywhere."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from config import ConfigError, Settings, load_settings
from storage.db import Database
from storage.files import BlobStore
from storage.index import Index
from storage.queue import JobQueue

#: The ``--config`` option every command that needs the configuration takes (DESIGN.md).
CONFIG_OPTION = typer.Option(None, "--config", "-c", metavar="FILE",
                             help="TOML configuration (default: $SPINE_NODE_CONFIG, "
                                  "else the embedded defaults)")


def settings_or_exit(config: Path | None) -> Settings:
    """Load the settings; on a bad key print the reason and exit with status 2."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        print(f"spine-node: configuration error:\n{exc}", file=sys.stderr)
        raise typer.Exit(2) from None


@dataclass
class NodeContext:
    settings: Settings
    db: Database
    index: Index
    queue: JobQueue
    store: BlobStore

    @classmethod
    def open(cls, settings: Settings, *, upgrade: bool = True) -> "NodeContext":
        db = Database.from_settings(settings)
        if upgrade:
            db.upgrade()
        store = BlobStore(settings.storage.root, min_free_mb=settings.storage.min_free_mb,
                          fsync=settings.storage.fsync,
                          direct_io=settings.storage.direct_io)
        return cls(settings, db, Index(db), JobQueue(db), store)

    def close(self) -> None:
        self.index.close()
        self.db.dispose()
