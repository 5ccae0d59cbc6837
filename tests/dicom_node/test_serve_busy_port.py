"""A second ``spine-node serve`` on a busy port (DICOM or HTTP) says so in one line that names
the address and the setting, and exits with status 2 as for a bad configuration value, before
it touches the store (the start-up recovery would delete a running node's temporaries)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, node_config, write_config


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that another process (this test) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _serve(tmp_path, **sections) -> subprocess.CompletedProcess:
    config = write_config(tmp_path / "spine-node.toml", node_config(tmp_path, **sections))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}
    return subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
                          check=False, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)


@pytest.mark.parametrize("section,setting", [("http", "http.port"), ("node", "node.port")])
def test_serve_on_a_busy_port_names_it_in_one_line_and_exits_2(tmp_path, busy_port, section,
                                                               setting):
    # What a running node would have in flight: start-up recovery would remove it.
    temporary = tmp_path / "store" / "instances" / ".tmp-in-flight"
    temporary.parent.mkdir(parents=True)
    temporary.write_bytes(b"a running node's half-written instance")

    res = _serve(tmp_path, **{section: {"port": busy_port}})

    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert f"127.0.0.1:{busy_port}" in lines[0] and f"({setting})" in lines[0], lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert temporary.exists()
    assert not (tmp_path / "store" / "spine-node.db").exists()

