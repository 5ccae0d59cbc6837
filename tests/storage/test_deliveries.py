"""The delivery queue: one row per result and destination, claims as leases, exponential
backoff then dead, resend (storage/deliveries.py)."""
from __future__ import annotations

import datetime as dt
import threading

import pytest

from storage.db import Database, utcnow
from storage.deliveries import Backoff, DeliveryQueue, DestinationWants, NewResult
from storage.models import Job, JobState, Series, Study


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db(request, tmp_path):
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    else:
        database = Database(request.getfixturevalue("postgres_url"))
    database.upgrade()
    yield database
    if request.param == "postgresql":  # postgres_url (tests/conftest.py): empty it between tests
        with database.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE deliveries, results, jobs, series, studies "
                                 "RESTART IDENTITY CASCADE")
    database.dispose()


def _job(db: Database, study_uid="1.2.3", series_uid="1.2.3.4", version=1,
         state=JobState.DONE) -> int:
    with db.session() as s, s.begin():
        study = s.query(Study).filter_by(study_instance_uid=study_uid).one_or_none()
        if study is None:
            study = Study(study_instance_uid=study_uid)
            s.add(study)
            s.flush()
        series = s.query(Series).filter_by(series_instance_uid=series_uid).one_or_none()
        if series is None:
            series = Series(study_id=study.id, series_instance_uid=series_uid, modality="CT")
            s.add(series)
            s.flush()
        job = Job(series_id=series.id, study_instance_uid=study_uid,
                  series_instance_uid=series_uid, version=version, state=state.value)
        s.add(job)
        s.flush()
        return job.id


def _results(job_id: int, version: int = 1) -> list[NewResult]:
    return [NewResult(k, f"results/x/v{version}-job{job_id}/{k}.dcm", f"2.25.{job_id}{i}", "2.25.9")
            for i, k in enumerate(("seg", "sr", "key_image", "summary"))]


ALL = DestinationWants("pacs")
KEY_ONLY = DestinationWants("viewer", ("key_image",))


def test_one_delivery_per_dicom_result_and_destination_respecting_objects(db):
    q = DeliveryQueue(db)
    job = _job(db)
    ids = q.add_results(job, _results(job), [ALL, KEY_ONLY])
    assert len(ids) == 4
    rows = q.for_study("1.2.3")
    assert sorted((r["destination"], r["kind"]) for r in rows) == [
        ("pacs", "key_image"), ("pacs", "seg"), ("pacs", "sr"), ("viewer", "key_image")]
    assert {r["state"] for r in rows} == {"pending"}
    # Publishing the same job again (a crash between store and commit) adds nothing.
    assert q.add_results(job, _results(job), [ALL, KEY_ONLY]) == ids
    assert len(q.for_study("1.2.3")) == 4


def test_claim_is_a_lease_that_no_second_claimer_gets(db):
    q = DeliveryQueue(db)
    job = _job(db)
    q.add_results(job, _results(job), [ALL])
    first = q.claim_due("pacs", lease_s=60)
    assert [c.kind for c in first] == ["seg", "sr", "key_image"]
    assert q.claim_due("pacs") == []
    later = utcnow() + dt.timedelta(seconds=61)
    assert len(q.claim_due("pacs", now=later)) == 3          # the lease ran out: due again
    q.release(c.id for c in first)
    assert len(q.claim_due("pacs")) == 3


def test_a_restart_releases_the_claims_of_its_dead_exporter_only(db):
    """A node that crashed and restarts gets its own leases back at once (PostgreSQL: other
    exporters share the queue, so only dead claimers of this host are released)."""
    import os
    import subprocess
    import sys

    from storage.queue import host_prefix

    q = DeliveryQueue(db)
    for n in range(3):
        job = _job(db, series_uid=f"1.2.3.{n}")
        q.add_results(job, _results(job), [ALL])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dead = f"{host_prefix()}{gone}:exporter:dead01"
    alive = f"{host_prefix()}{os.getppid()}:exporter:live01"   # pytest's parent runs
    elsewhere = f"other-host-{os.getpid()}:1:exporter:away01"
    held = {who: q.claim_due("pacs", limit=3, lease_s=600, claimed_by=who)
            for who in (dead, alive, elsewhere)}
    assert all(len(c) == 3 for c in held.values())
    assert q.claim_due("pacs") == []                       # all leased for 10 minutes
    assert q.release_dead_local() == 3
    again = q.claim_due("pacs", lease_s=600, claimed_by=alive)
    assert sorted(c.id for c in again) == sorted(c.id for c in held[dead])
    assert q.release_dead_local() == 0                     # live and foreign claims stay
    q.mark_delivered(again[0].id)
    assert q.claim_due("pacs") == []


def test_concurrent_claimers_never_share_a_delivery(db):
    q = DeliveryQueue(db)
    for n in range(6):
        job = _job(db, series_uid=f"1.2.3.{n}")
        q.add_results(job, _results(job), [ALL])
    got: list[int] = []
    lock = threading.Lock()

    def claim():
        while True:
            batch = DeliveryQueue(db).claim_due("pacs", limit=2)
            if not batch:
                return
            with lock:
                got.extend(c.id for c in batch)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 18


def test_failures_back_off_exponentially_up_to_the_ceiling_then_dead(db):
    q = DeliveryQueue(db)
    job = _job(db)
    q.add_results(job, _results(job)[:1], [ALL])
    policy = Backoff(start_s=10, factor=3, max_s=100, max_attempts=5)
    now = utcnow()
    delays = []
    for _ in range(4):
        (c,) = q.claim_due("pacs", now=now + dt.timedelta(days=1))
        out = q.record_failure(c.id, "connection refused", policy, now=now)
        delays.append((out.next_attempt_at - now).total_seconds())
        assert out.state.value == "pending"
    assert delays == [10, 30, 90, 100]
    (c,) = q.claim_due("pacs", now=now + dt.timedelta(days=1))
    out = q.record_failure(c.id, "connection refused", policy, now=now)
    assert out.state.value == "dead" and out.attempts == 5
    assert q.claim_due("pacs", now=now + dt.timedelta(days=2)) == []
    row = q.for_study("1.2.3")[0]
    assert (row["state"], row["last_error"]) == ("dead", "connection refused")
    assert Backoff(start_s=1, factor=2, max_s=50).delay_s(5000) == 50


def test_resend_revives_dead_and_delivered_of_the_latest_version_only(db):
    q = DeliveryQueue(db)
    v1 = _job(db, version=1)
    q.add_results(v1, _results(v1, 1), [ALL])
    v2 = _job(db, version=2)
    q.add_results(v2, _results(v2, 2), [ALL])
    for c in q.claim_due("pacs"):
        q.mark_delivered(c.id)
    assert {r["state"] for r in q.for_study("1.2.3")} == {"delivered"}
    n = q.resend("1.2.3", [ALL, KEY_ONLY])
    rows = q.for_study("1.2.3")
    pending = [r for r in rows if r["state"] == "pending"]
    assert n == len(pending) == 4                 # v2's three for pacs + the new viewer row
    assert {r["version"] for r in pending} == {2}
    assert all(r["attempts"] == 0 for r in pending)
    assert q.resend("9.9.9", [ALL]) == 0
