"""What the administration commands print: ``rerun`` tells an unknown study, a study with no
chosen series and a job already queued apart; the audit record of each action goes to the audit
table, not to the user's terminal (except where no table can take it)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from storage.db import Database
from tests.helpers import free_port, write_ct_series


@pytest.fixture
def node(node_factory):
    # No worker and a long stable time: a series stays undecided until the test reruns it.
    return node_factory(worker={"count": 0},
                        scheduler={"stable_seconds": 3600, "poll_seconds": 0.5}).start()


def _audit(node) -> list[tuple[str, str, dict]]:
    db = Database(f"sqlite:///{node.store_root}/spine-node.db")
    try:
        with db.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT event_type, outcome, details FROM audit_events ORDER BY id").all()
    finally:
        db.dispose()
    return [(t, o, json.loads(d) if isinstance(d, str) else d) for t, o, d in rows]


@pytest.mark.integration
def test_rerun_says_unknown_study_no_chosen_series_or_already_queued(node, tmp_path):
    written = write_ct_series(tmp_path / "ct", n_slices=4, rows=8, columns=8)
    node.cli("send", str(written.directory))
    study, series = written.study_instance_uid, written.series_instance_uid

    unknown = node.cli("rerun", "1.2.3.4", check=False)
    assert unknown.returncode == 1
    assert "error: no study 1.2.3.4 in this node's database" in unknown.stderr

    undecided = node.cli("rerun", study, check=False)
    assert undecided.returncode == 1
    assert f"no series of study {study} is chosen for analysis" in undecided.stderr

    other = node.cli("rerun", study, "--series", "1.2.3.5", check=False)
    assert other.returncode == 1
    assert f"error: study {study} has no series 1.2.3.5" in other.stderr

    queued = node.cli("rerun", study, "--series", series)
    assert f"queued job 1 (version 1) for series {series}" in queued.stdout
    again = node.cli("rerun", study, "--series", series)
    assert again.stdout.strip() == (f"job 1 (version 1) for series {series} is already "
                                    "queued: no new job")

    # Each action is in the audit table; none printed its audit record on the terminal.
    for res in (unknown, undecided, other, queued, again):
        assert '"audit"' not in res.stdout + res.stderr, res
    reruns = [(o, d.get("reason")) for t, o, d in _audit(node) if t == "rerun"]
    assert [o for o, _ in reruns] == ["nothing", "nothing", "nothing", "success", "nothing"]
    assert "no study 1.2.3.4" in reruns[0][1] and reruns[4][1] is None


def test_echo_prints_its_audit_record_only_where_no_database_can_take_it(node, tmp_path):
    peer = f"NOBODY@127.0.0.1:{free_port()}"
    with_db = node.cli("echo", peer, "--timeout", "2", check=False)
    assert with_db.returncode == 1 and '"audit"' not in with_db.stderr
    assert [o for t, o, _ in _audit(node) if t == "echo"] == ["failed"]

    # Another configuration whose database does not exist: echo does not create one, so the
    # record goes to stderr as a JSON line (the only place left for it).
    config = node.config_path.read_text().replace(str(node.store_root),
                                                  str(tmp_path / "no-store"))
    (tmp_path / "other.toml").write_text(config)
    res = subprocess.run([sys.executable, "-m", "dicom_node", "echo", peer, "--timeout", "2",
                          "--config", str(tmp_path / "other.toml")], check=False,
                         capture_output=True, text=True, cwd=node.root, env=node.env, timeout=60)
    assert res.returncode == 1
    [line] = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    assert line["audit"] is True and line["event"] == "echo" and line["peer"] == peer
    assert not (tmp_path / "no-store" / "spine-node.db").exists()
