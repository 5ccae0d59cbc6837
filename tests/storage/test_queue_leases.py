"""Job leases on a shared queue (issue 7, "Scale-out"): a worker's running job is re-queued
when its worker is gone, never while it is alive, whichever machine it runs on.

- at start a process re-queues only jobs of dead processes of its own host (``dead_local``);
- the heartbeat (:class:`dicom_node.worker.Heartbeat`) keeps live jobs fresh and re-queues jobs
  whose heartbeat is older than ``worker.lease_seconds`` (a worker that died elsewhere).
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess

import pytest
from sqlalchemy import update

from storage.db import Database, utcnow
from storage.index import Index, InstanceRecord
from storage.models import Job
from storage.queue import JobQueue, new_worker_id


def _queue_three(db: Database) -> list[int]:
    index = Index(db)
    for s in range(3):
        index.add_instance(InstanceRecord(
            "1.2.3", f"1.2.3.{s + 1}", f"1.2.3.{s + 1}.1", "1.2.840.10008.5.1.4.1.1.2",
            "1.2.840.10008.1.2.1", "CT", f"instances/1.2.3/1.2.3.{s + 1}/x.dcm", 10, 1))
    for series in index.stable_series(utcnow() + dt.timedelta(seconds=1)):
        index.schedule_series(series, skip_reason=None)
    return [j.id for j in index.jobs()]


def _exercise_leases(db: Database) -> None:
    from config import load_settings
    from dicom_node.worker import Heartbeat

    queue = JobQueue(db)
    _queue_three(db)
    host = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = new_worker_id("worker")                      # this process: alive
    other_live = f"{host}:{os.getppid()}:worker:aaaaaa"  # another live process of this host
    dead = f"{host}:{gone.pid}:worker:bbbbbb"            # a process of this host that is gone
    elsewhere = "some-other-machine:4242:worker:cccccc"  # another machine: only leases tell
    a = queue.claim(other_live)
    b = queue.claim(dead)
    c = queue.claim(elsewhere)
    assert None not in (a, b, c)

    # Start of a process on this host: only the dead local worker's job comes back.
    assert queue.requeue_running(max_attempts=3, dead_local=True) == (1, 0)
    states = {j.id: (j.state, j.claimed_by) for j in Index(db).jobs()}
    assert states[b.id] == ("queued", None)
    assert states[a.id][0] == states[c.id][0] == "running"

    # Leases: the live worker beats, the other machine's worker went silent long ago.
    with db.session() as s, s.begin():
        s.execute(update(Job).where(Job.id.in_([a.id, c.id])).values(
            updated_at=utcnow() - dt.timedelta(seconds=600)))

    class _W:  # what Heartbeat reads of a Worker
        def __init__(self, worker_id, current):
            self.worker_id, self.current = worker_id, current

    settings = load_settings(None, worker={"lease_seconds": 60, "max_attempts": 3})
    beat = Heartbeat([_W(other_live, a)], queue, settings)
    assert beat.beat() == (1, 0)                        # c re-queued, a refreshed and kept
    states = {j.id: (j.state, j.claimed_by) for j in Index(db).jobs()}
    assert states[a.id] == ("running", other_live)
    assert states[c.id] == ("queued", None)
    # Each re-queued job is claimed once more and finishes exactly once.
    again = {queue.claim(live).id, queue.claim(live).id}
    assert again == {b.id, c.id} and queue.claim(live) is None
    assert {j.attempts for j in Index(db).jobs() if j.id in again} == {2}


def test_leases_on_sqlite(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/q.db")
    db.upgrade()
    try:
        _exercise_leases(db)
    finally:
        db.dispose()


@pytest.mark.integration
def test_leases_on_postgresql(postgres_url):
    from tests.helpers import create_pg_database
    db = Database(create_pg_database(postgres_url, "queue_leases"))
    db.upgrade()
    try:
        _exercise_leases(db)
    finally:
        db.dispose()
