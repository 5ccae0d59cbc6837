"""Administration commands: exact JSON shapes, rerun -> new version, resend, echo, db upgrade,
audit events."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from storage.db import Database
from storage.index import Index
from tests.dicom_node.test_worker_scheduler import _ingest, _tick
from tests.helpers import free_port, write_config

runner = CliRunner()


@pytest.fixture
def config(tmp_path, monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("SPINE_NODE_"):
            monkeypatch.delenv(key)
    return write_config(tmp_path / "n.toml", {
        "storage": {"root": str(tmp_path / "store"), "min_free_mb": 0, "fsync": False},
        "scheduler": {"stable_seconds": 0},
        # its 20 slices of 1 mm cover 19 mm, and hold a disc, not a spine
        "selection": {"min_coverage_mm": 0, "spine_check": False}})


def _run(*args):
    res = runner.invoke(app, list(args))
    return res


def _audit(config_path):
    from config import load_settings
    db = Database.from_settings(load_settings(config_path))
    try:
        return [(e.event_type, e.outcome, e.details) for e in
                reversed(Index(db).audit_events())]
    finally:
        db.dispose()


def test_db_upgrade_studies_jobs_rerun(config, tmp_path):
    res = _run("db", "upgrade", "--config", str(config))
    assert res.exit_code == 0 and "revision 0003" in res.output
    assert json.loads(_run("studies", "--json", "--config", str(config)).output) == []
    assert json.loads(_run("jobs", "--json", "--config", str(config)).output) == []

    from config import load_settings
    from dicom_node.context import NodeContext
    from tests.helpers import write_ct_series
    ctx = NodeContext.open(load_settings(config))
    w = write_ct_series(tmp_path / "ct", n_slices=20, rows=8, columns=8)
    _ingest(ctx, w)
    _tick(ctx)
    ctx.close()

    studies = json.loads(_run("studies", "--json", "--config", str(config)).output)
    chosen = "chosen: 1 mm slices, 19 mm z coverage; first of 1 eligible series"
    assert studies == [{"study_instance_uid": w.study_instance_uid, "series": [
        {"series_instance_uid": w.series_instance_uid, "modality": "CT", "instances": 20,
         "state": "queued", "chosen": True, "reason": chosen}]}]
    [job] = json.loads(_run("jobs", "--json", "--config", str(config)).output)
    assert job == {"id": 1, "study_instance_uid": w.study_instance_uid,
                   "series_instance_uid": w.series_instance_uid, "state": "queued",
                   "error": None, "attempts": 0, "reason": chosen}
    # A queued job already covers the study: no new job, and it says so.
    res = _run("rerun", w.study_instance_uid, "--config", str(config))
    assert res.exit_code == 0 and "job 1 (version 1)" in res.output \
        and "already queued" in res.output
    ctx = NodeContext.open(load_settings(config))
    ctx.queue.claim("w")
    ctx.close()
    res = _run("rerun", w.study_instance_uid, "--config", str(config))
    assert res.exit_code == 0 and "version 2" in res.output
    jobs = json.loads(_run("jobs", "--json", "--config", str(config)).output)
    assert [j["state"] for j in jobs] == ["running", "queued"]
    assert _run("rerun", "1.2/../3", "--config", str(config)).exit_code == 2
    events = [e for e in _audit(config) if e[0] in ("db_upgrade", "rerun")]  # the actions
    assert [e[:2] for e in events] == [("db_upgrade", "success"), ("rerun", "nothing"),
                                       ("rerun", "success")]
    assert events[2][2]["study_instance_uid"] == w.study_instance_uid


def test_resend_without_results_says_so(config):
    res = _run("resend", "1.2.3", "--config", str(config))
    assert res.exit_code == 1
    assert "no results of study 1.2.3" in res.output
    assert _audit(config)[-1][:2] == ("resend", "nothing")


def test_echo_unreachable_peer_fails_readably(config):
    res = _run("echo", f"NOBODY@127.0.0.1:{free_port()}", "--config", str(config),
               "--timeout", "2")
    assert res.exit_code == 1
    assert "association" in res.output
    assert _run("echo", "not-a-peer", "--config", str(config)).exit_code == 2
