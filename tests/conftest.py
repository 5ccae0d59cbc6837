"""The shared pytest fixtures: ``node_factory`` (``spine-node serve`` as a subprocess on free ports
with a temporary config) and ``postgres_url`` (a PostgreSQL server of its own for the session).
Their helpers, and the other shared test code, are in :mod:`tests.helpers`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, NodeProcess, node_config, write_config


@pytest.fixture
def node_factory(tmp_path_factory):
    """``node_factory(**sections) -> NodeProcess`` (not started); all are stopped at the end."""
    nodes: list[NodeProcess] = []

    def make(**sections: dict[str, Any]) -> NodeProcess:
        root = tmp_path_factory.mktemp("node")
        cfg = node_config(root, **sections)
        path = write_config(root / "spine-node.toml", cfg)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        node = NodeProcess(root=root, config=cfg, config_path=path,
                           log_path=root / "node.log", env=env)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        try:
            node.stop(timeout=20)
        except Exception:  # noqa: BLE001
            node.kill9()


# -- PostgreSQL --------------------------------------------------------------------------------
def _pg_bindir() -> Path | None:
    base = Path("/usr/lib/postgresql")
    if not base.exists():
        return None
    for version in sorted(base.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0,
                          reverse=True):
        if (version / "bin" / "initdb").exists():
            return version / "bin"
    return None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of its own for the session (initdb + pg_ctl, Unix socket only, no
    TCP port): ``postgresql+psycopg2://spine@/postgres?host=<socket dir>``. Each user of the
    fixture should create its own database (:func:`create_pg_database`). Skipped without the
    server binaries (apt-get install postgresql) or psycopg2."""
    import tempfile
    pytest.importorskip("psycopg2")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="spine-node-pg-"))  # the postgres user must reach it
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "spine", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l",
                    str(base / "pg.log"), "-o", f"-k {sock} -c listen_addresses='' -F",
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://spine@/postgres?host={sock}"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
