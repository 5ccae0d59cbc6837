"""docs/operations.md's backup and restore commands work on a running node, for SQLite and for
PostgreSQL.

The commands are read from the guide's code blocks (section 6) and run with the test's store,
backup folder and database in place of /var/lib/spine-node, /backup and ``spine_node``; the lines
that manage the service (``sudo ...``) are done by killing and starting the test's node instead
(a restore usually follows a failure).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, storescu, write_ct_series

pytestmark = pytest.mark.integration

GUIDE = REPO / "docs" / "operations.md"


def _blocks(database: str) -> tuple[list[str], list[str]]:
    """The backup and the restore commands of the guide's paragraph on ``database``."""
    text = GUIDE.read_text()
    start = text.index(f"**{database}**")
    section = text[start:text.index("\n## ", start)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)[:2]
    assert len(blocks) == 2, f"the {database} paragraph has a backup and a restore block"
    backup, restore = ([line for line in block.splitlines()
                        if line.strip() and not line.startswith("sudo ")] for block in blocks)
    return backup, restore


def _run(lines: list[str], store: Path, backups: Path, pg_uri: str | None = None) -> None:
    today = dt.date.today().isoformat()
    for line in lines:
        command = (line.replace("/var/lib/spine-node", str(store))
                   .replace("/backup", str(backups))
                   .replace("2026-01-31", today))
        if pg_uri is not None:
            command = command.replace("--dbname=spine_node", f"--dbname='{pg_uri}'")
        run = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, f"{command}\n{run.stdout}{run.stderr}"


def _instances(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((store / "instances").rglob("*.dcm"))}


def _series(node) -> dict[str, int]:
    return {s["series_instance_uid"]: s["instances"]
            for study in node.cli_json("studies") for s in study["series"]}


@pytest.mark.parametrize("database", ["SQLite", "PostgreSQL"])
def test_guide_backup_of_a_running_node_restores_what_it_held(database, node_factory, tmp_path,
                                                              request):
    backup, restore = _blocks(database)
    pg_uri = None
    if database == "SQLite":
        if shutil.which("sqlite3") is None:
            pytest.skip("sqlite3 is not installed (apt-get install sqlite3)")
        assert any(line.startswith("sqlite3 ") for line in backup)
        node = node_factory(worker={"count": 0})
    else:
        from tests.helpers import create_pg_database

        url = create_pg_database(request.getfixturevalue("postgres_url"), "backup_restore")
        pg_uri = url.replace("postgresql+psycopg2://", "postgresql://")
        assert any(line.startswith("pg_dump ") for line in backup)
        node = node_factory(worker={"count": 0}, storage={"database_url": url})
    node.start()
    store = node.store_root
    backups = tmp_path / "backup"
    backups.mkdir()

    before = write_ct_series(tmp_path / "before", n_slices=8, rows=32, columns=32)
    assert storescu(node, before.directory).returncode == 0
    held = _instances(store)
    assert len(held) == 8

    _run(backup, store, backups, pg_uri)  # while the node runs

    after = write_ct_series(tmp_path / "after", n_slices=3, rows=32, columns=32)
    assert storescu(node, after.directory).returncode == 0
    assert _series(node) == {before.series_instance_uid: 8, after.series_instance_uid: 3}
    node.kill9()  # restores follow failures: SQLite's WAL files are left behind, for one
    if database == "SQLite":
        assert (store / "spine-node.db-wal").exists()

    _run(restore, store, backups, pg_uri)

    node.start()
    assert _series(node) == {before.series_instance_uid: 8}, \
        "the node is back at the time of the backup"
    assert _instances(store) == held, "every instance file comes back byte for byte"
    if database == "SQLite":
        check = subprocess.run(["sqlite3", str(store / "spine-node.db"),
                                "PRAGMA integrity_check"], capture_output=True, text=True,
                               timeout=60)
        assert check.stdout.strip() == "ok"
    # The restored node goes on receiving.
    assert storescu(node, after.directory).returncode == 0
    assert _series(node)[after.series_instance_uid] == 3
