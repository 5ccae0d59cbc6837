"""Scale-out (issue 7): ``spine-node serve`` plus a ``spine-node worker`` process on one
PostgreSQL database and one shared store. Ten studies are each processed exactly once and none
is left stuck; a worker killed in the middle of a job has that job re-queued by the next
process that starts on the host (and, on any machine, by the heartbeat lease:
tests/storage/test_queue_leases.py), and it finishes exactly once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import create_pg_database, storescu, write_ct_series

pytestmark = pytest.mark.integration

FAKE = "tests.dicom_node.fake_pipeline:"


def _worker(node, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dicom_node", "worker", "--config",
                             str(node.config_path)], cwd=node.root,
                            env={**node.env, **env}, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _claimers(url: str) -> dict[int, str]:
    from sqlalchemy import create_engine, text
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, claimed_by FROM jobs")).all())
    engine.dispose()
    return rows


def test_serve_and_a_worker_process_share_a_postgresql_queue(node_factory, postgres_url,
                                                             tmp_path):
    url = create_pg_database(postgres_url, "scale_out")
    node = node_factory(pipeline={"entry_point": FAKE + "second_analyse"},
                        storage={"database_url": url}, worker={"count": 1, "poll_seconds": 0.2})
    node.start()
    worker_log = tmp_path / "worker.log"
    worker = _worker(node, worker_log)
    try:
        series = []
        for k in range(10):
            w = write_ct_series(tmp_path / f"s{k}", n_slices=20, rows=16, columns=16)
            series.append(w.series_instance_uid)
            assert storescu(node, w.directory).returncode == 0

        def all_done():
            jobs = node.cli_json("jobs")
            return jobs if len(jobs) == 10 and all(j["state"] == "done" for j in jobs) \
                else None

        jobs = node.wait_for(all_done, timeout=120, interval=0.5, what="10 jobs done")
    finally:
        _stop(worker)
    assert sorted(j["series_instance_uid"] for j in jobs) == sorted(series)
    assert all(j["attempts"] == 1 for j in jobs), jobs          # nobody ran a job twice
    summaries = list(node.store_root.glob("results/*/*/v1-job*/summary.json"))
    assert len(summaries) == 10                                 # one result set per study
    started = node.log().count('"job started"') + worker_log.read_text().count('"job started"')
    assert started == 10
    kinds = {c.split(":")[2] for c in _claimers(url).values() if c}
    assert kinds == {"serve", "worker"}, kinds                  # both took part


def test_worker_killed_mid_job_is_requeued_and_finished_once(node_factory, postgres_url,
                                                             tmp_path):
    url = create_pg_database(postgres_url, "scale_out_crash")
    node = node_factory(pipeline={"entry_point": FAKE + "analyse"},
                        storage={"database_url": url}, worker={"count": 0})
    node.start()
    slow = _worker(node, tmp_path / "slow.log",
                   SPINE_NODE_PIPELINE__ENTRY_POINT=FAKE + "slow_analyse")
    try:
        w = write_ct_series(tmp_path / "ct", n_slices=20, rows=16, columns=16)
        assert storescu(node, w.directory).returncode == 0
        node.wait_for(lambda: [j for j in node.cli_json("jobs") if j["state"] == "running"],
                      timeout=60, what="the slow worker to claim the job")
        os.kill(slow.pid, 9)
        slow.wait()
        # The job stays claimed by the dead worker until a process of this host starts
        # (or, from another machine, until its lease runs out).
        assert [j["state"] for j in node.cli_json("jobs")] == ["running"]
        fresh = _worker(node, tmp_path / "fresh.log")
        try:
            [job] = node.wait_for(lambda: [j for j in node.cli_json("jobs")
                                           if j["state"] == "done"], timeout=60,
                                  what="the re-queued job done")
        finally:
            _stop(fresh)
    finally:
        _stop(slow)
    assert job["attempts"] == 2
    assert len(list(node.store_root.glob("results/*/*/v1-job*/summary.json"))) == 1
