"""Schema (Alembic = models), the index, and job claims on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import text

from storage.db import Database, utcnow
from storage.index import Index, InstanceRecord
from storage.models import Base, JobState
from storage.queue import JobQueue


def _record(k: int, series: str = "1.2.3.1", study: str = "1.2.3", modality: str = "CT"):
    return InstanceRecord(study_instance_uid=study, series_instance_uid=series,
                          sop_instance_uid=f"{series}.{k}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", modality=modality,
                          path=f"instances/{study}/{series}/{series}.{k}.dcm", size_bytes=100,
                          instance_number=k)


@pytest.fixture
def sqlite_db(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/index.db")
    db.upgrade()
    yield db
    db.dispose()


def _exercise(db: Database) -> None:
    index, queue = Index(db), JobQueue(db)
    assert index.add_instance(_record(1))
    assert not index.add_instance(_record(1))  # duplicate SOP Instance UID: stored once
    for k in range(2, 26):
        index.add_instance(_record(k))
    [series] = index.stable_series(utcnow() + dt.timedelta(seconds=1))
    assert series.instances == 25
    job = index.schedule_series(series, skip_reason=None)
    assert job.state == "queued" and job.version == 1
    assert index.stable_series(utcnow() + dt.timedelta(seconds=1)) == []
    claimed = queue.claim("w1")
    assert claimed.id == job.id and claimed.attempts == 1
    assert queue.claim("w2") is None
    assert index.studies()[0]["series"][0]["state"] == "processing"
    # A late instance re-opens the series: a new job version, not a split.
    index.add_instance(_record(99))
    assert queue.finish(claimed.id, JobState.DONE, worker_id="w1")
    assert index.studies()[0]["series"][0]["state"] == "receiving"
    [series] = index.stable_series(utcnow() + dt.timedelta(seconds=1))
    job2 = index.schedule_series(series, skip_reason=None)
    assert job2.version == 2 and job2.instances == 26
    # Crash recovery: running -> queued, and failed after max attempts.
    c2 = queue.claim("w1")
    assert queue.requeue_running(max_attempts=3) == (1, 0)
    queue.claim("w1")
    queue.requeue_running(max_attempts=3)
    assert queue.claim("w1").attempts == 3
    assert queue.requeue_running(max_attempts=3) == (0, 1)
    assert "stopped during this job 3 times" in index.job(c2.id).error
    counts = index.job_counts()
    assert counts["done"] == 1 and counts["failed"] == 1
    index.audit("test", "pytest", "success", {"n": 1})
    assert index.audit_events()[0].details == {"n": 1}
    with pytest.raises(Exception, match="append-only"):
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_events"))


def test_migration_matches_models(sqlite_db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    with sqlite_db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
        assert diff == []
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert sqlite_db.upgrade() == "0003"  # idempotent


def test_index_and_queue_on_sqlite(sqlite_db):
    _exercise(sqlite_db)


def test_skipped_series_and_queued_job_kept(sqlite_db):
    index = Index(sqlite_db)
    for k in range(3):
        index.add_instance(_record(k, series="1.5.1", modality="MR"))
    [series] = index.stable_series(utcnow() + dt.timedelta(seconds=1))
    job = index.schedule_series(series, skip_reason="modality MR is not selected")
    assert job.state == "skipped" and job.error == "modality MR is not selected"
    assert index.studies()[0]["series"][0]["state"] == "skipped"


def test_concurrent_claimers_take_each_job_once(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/index.db")
    db.upgrade()
    index = Index(db)
    for s in range(12):
        index.add_instance(_record(1, series=f"1.2.3.{s + 1}"))
    for series in index.stable_series(utcnow() + dt.timedelta(seconds=1)):
        index.schedule_series(series, skip_reason=None)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(name):
        other = JobQueue(Database(f"sqlite:///{tmp_path}/index.db"))
        while (job := other.claim(name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"w{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 12
    db.dispose()


# -- PostgreSQL: the `postgres_url` fixture (tests/conftest.py) -------------------------------
@pytest.mark.integration
def test_index_and_queue_on_postgresql(postgres_url):
    from tests.helpers import create_pg_database
    db = Database(create_pg_database(postgres_url, "index_queue"))
    assert db.upgrade() == "0003"
    try:
        _exercise(db)
        # SKIP LOCKED: a claim while another transaction holds the only queued row gets None.
        index, queue = Index(db), JobQueue(db)
        index.add_instance(_record(1, series="1.9.1"))
        [series] = [s for s in index.stable_series(utcnow() + dt.timedelta(seconds=1))
                    if s.series_instance_uid == "1.9.1"]
        index.schedule_series(series, skip_reason=None)
        with db.engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT id FROM jobs WHERE state = 'queued' FOR UPDATE"))
            assert queue.claim("w-other") is None
        assert queue.claim("w-other") is not None
    finally:
        db.dispose()


def test_upgrade_from_0001_keeps_deliveries_and_adds_claimed_by(tmp_path):
    """An installed node on the first schema upgrades in place (docs/operations.md)."""
    from storage.migrate import upgrade
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    assert upgrade(db.engine, "0001") == "0001"
    with db.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO studies (id, study_instance_uid, created_at, updated_at) "
                             "VALUES (1, '1.2', '2026-01-01', '2026-01-01')")
        conn.exec_driver_sql("INSERT INTO series (id, study_id, series_instance_uid, modality, state, "
                             "first_received_at, last_received_at, updated_at) VALUES "
                             "(1, 1, '1.2.3', 'CT', 'done', '2026-01-01', '2026-01-01', '2026-01-01')")
    assert db.upgrade() == "0003"
    with db.engine.connect() as conn:
        cols = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(deliveries)")]
        assert "claimed_by" in cols
        assert conn.exec_driver_sql("SELECT count(*) FROM series").scalar() == 1
    db.dispose()


def _exercise_study_selection(db: Database) -> None:
    """The index side of issue 27: a study is offered once all its series are stable, with
    the decided series beside the new ones; reasons reach ``studies``; rerun --series."""
    index = Index(db)
    for k in range(3):
        index.add_instance(_record(k, series="2.1.1", study="2.1"))
        index.add_instance(_record(k, series="2.1.2", study="2.1"))
    assert index.stable_studies(utcnow() - dt.timedelta(seconds=60)) == []   # not yet stable
    [study] = index.stable_studies(utcnow() + dt.timedelta(seconds=1))
    assert [(s.series_instance_uid, s.pending, s.was_chosen) for s in study] == [
        ("2.1.1", True, False), ("2.1.2", True, False)]
    index.schedule_series(study[0], skip_reason=None, reason="chosen: the best")
    index.schedule_series(study[1], skip_reason="not chosen: series 2.1.1 is analysed")
    assert index.stable_studies(utcnow() + dt.timedelta(seconds=1)) == []
    index.add_instance(_record(1, series="2.1.3", study="2.1"))            # a late series
    [study] = index.stable_studies(utcnow() + dt.timedelta(seconds=1))
    assert [(s.series_instance_uid, s.pending, s.was_chosen) for s in study] == [
        ("2.1.1", False, True), ("2.1.2", False, False), ("2.1.3", True, False)]
    [entry] = index.studies("2.1")
    assert [(s["chosen"], s["reason"]) for s in entry["series"]] == [
        (True, "chosen: the best"), (False, "not chosen: series 2.1.1 is analysed"),
        (False, None)]
    assert index.rerun_study("2.1", "2.1.2")[0].reason.startswith("chosen by an operator")
    assert index.rerun_study("2.1") == []      # the chosen one is queued already


def test_study_selection_on_sqlite(sqlite_db):
    _exercise_study_selection(sqlite_db)


@pytest.mark.integration
def test_study_selection_on_postgresql(postgres_url):
    from tests.helpers import create_pg_database
    db = Database(create_pg_database(postgres_url, "study_selection"))
    db.upgrade()
    try:
        _exercise_study_selection(db)
    finally:
        db.dispose()
