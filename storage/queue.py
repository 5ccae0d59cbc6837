"""Job claims. Several workers (on several machines) share one PostgreSQL queue by claiming
rows with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite the claim is a single
``UPDATE ... WHERE id = (SELECT ...) RETURNING`` statement, which takes the database write lock
for its whole duration, so exactly one claimer wins each job.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select, text, update

from storage.db import Database, utcnow
from storage.models import Job, JobState, Series, SeriesState


@dataclass(frozen=True)
class JobRef:
    """A claimed job, as a worker (and ``dicom_node.results.publish``) sees it."""

    id: int
    series_id: int
    study_instance_uid: str
    series_instance_uid: str
    version: int
    attempts: int


def new_worker_id(kind: str = "worker") -> str:
    """``host:pid:kind:random``; the host prefix lets a restarted node find its own jobs."""
    return f"{socket.gethostname()}:{os.getpid()}:{kind}:{uuid.uuid4().hex[:6]}"


def host_prefix() -> str:
    return f"{socket.gethostname()}:"


def claimer_is_dead(claimed_by: str | None) -> bool:
    """True when ``claimed_by`` names a process of this host that no longer runs (or this
    very process, which cannot hold a claim before it claimed anything: a previous life of a
    container whose PID is always the same)."""
    if not claimed_by or not claimed_by.startswith(host_prefix()):
        return False
    try:
        pid = int(claimed_by[len(host_prefix()):].split(":", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


_CLAIM_SQLITE = text(
    "UPDATE jobs SET state = 'running', claimed_by = :worker, attempts = attempts + 1, "
    "started_at = :now, updated_at = :now "
    "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1) "
    "AND state = 'queued' "
    "RETURNING id, series_id, study_instance_uid, series_instance_uid, version, attempts")


class JobQueue:
    def __init__(self, db: Database):
        self.db = db

    def claim(self, worker_id: str) -> JobRef | None:
        """Claim the oldest queued job for ``worker_id``, or None when the queue is empty."""
        now = utcnow()
        with self.db.session() as s, s.begin():
            if self.db.is_sqlite:
                row = s.execute(_CLAIM_SQLITE, {"worker": worker_id, "now": now}).first()
                if row is None:
                    return None
                ref = JobRef(*row)
            else:
                job = s.scalar(select(Job).where(Job.state == JobState.QUEUED.value)
                               .order_by(Job.id).limit(1)
                               .with_for_update(skip_locked=True))
                if job is None:
                    return None
                job.state = JobState.RUNNING.value
                job.claimed_by = worker_id
                job.attempts += 1
                job.started_at = job.updated_at = now
                s.flush()
                ref = JobRef(job.id, job.series_id, job.study_instance_uid,
                             job.series_instance_uid, job.version, job.attempts)
            s.execute(update(Series).where(Series.id == ref.series_id,
                                           Series.state == SeriesState.QUEUED.value)
                      .values(state=SeriesState.PROCESSING.value, updated_at=now))
        return ref

    def finish(self, job_id: int, state: JobState, error: str | None = None, *,
               worker_id: str | None = None) -> bool:
        """Record the end of a running job (only if ``worker_id`` still holds it, when given);
        the series follows unless new instances re-opened it. False: the job was not ours."""
        now = utcnow()
        series_state = {JobState.DONE: SeriesState.DONE,
                        JobState.FAILED: SeriesState.FAILED,
                        JobState.SKIPPED: SeriesState.SKIPPED}[state]
        with self.db.session() as s, s.begin():
            cond = [Job.id == job_id, Job.state == JobState.RUNNING.value]
            if worker_id is not None:
                cond.append(Job.claimed_by == worker_id)
            done = s.execute(update(Job).where(*cond).values(
                state=state.value, error=error, finished_at=now, updated_at=now)).rowcount
            if not done:
                return False
            series_id = s.scalar(select(Job.series_id).where(Job.id == job_id))
            s.execute(update(Series).where(Series.id == series_id,
                                           Series.state == SeriesState.PROCESSING.value)
                      .values(state=series_state.value, updated_at=now))
        return True

    def requeue(self, job_id: int, reason: str = "") -> None:
        """Put a running job back (a draining worker that could not finish it)."""
        now = utcnow()
        with self.db.session() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value)
                      .values(state=JobState.QUEUED.value, claimed_by=None, updated_at=now,
                              error=reason or None))

    def heartbeat(self, worker_ids: Iterable[str]) -> int:
        """The workers ``worker_ids`` are alive: refresh their running jobs' ``updated_at``
        (the lease that :meth:`requeue_running` with ``stale_after_s`` checks)."""
        ids = [w for w in worker_ids if w]
        if not ids:
            return 0
        with self.db.session() as s, s.begin():
            return s.execute(update(Job).where(Job.state == JobState.RUNNING.value,
                                               Job.claimed_by.in_(ids))
                             .values(updated_at=utcnow())).rowcount or 0

    def requeue_running(self, *, max_attempts: int, claimed_by_prefix: str | None = None,
                        dead_local: bool = False, stale_after_s: float | None = None
                        ) -> tuple[int, int]:
        """Jobs left ``running`` by a crash go back to ``queued`` (or ``failed`` once they
        used ``max_attempts``). Without filters: every running job (a single node on SQLite
        at start). ``claimed_by_prefix``: only those workers' jobs. ``dead_local``: only jobs
        whose worker was a process of this host that is gone (safe with other processes and
        machines sharing the queue). ``stale_after_s``: only jobs whose heartbeat is older
        than this, whoever held them (a worker that died on another machine).
        Returns (requeued, failed)."""
        now = utcnow()
        requeued = failed = 0
        with self.db.session() as s, s.begin():
            q = select(Job).where(Job.state == JobState.RUNNING.value)
            if claimed_by_prefix:
                q = q.where(Job.claimed_by.like(f"{claimed_by_prefix}%"))
            if dead_local:
                q = q.where(Job.claimed_by.like(f"{host_prefix()}%"))
            if stale_after_s is not None:
                q = q.where(Job.updated_at < now - dt.timedelta(seconds=stale_after_s))
            for job in s.scalars(q.with_for_update() if not self.db.is_sqlite else q):
                if dead_local and not claimer_is_dead(job.claimed_by):
                    continue
                job.updated_at = now
                job.claimed_by = None
                if job.attempts >= max_attempts:
                    job.state = JobState.FAILED.value
                    job.error = (f"the worker stopped during this job {job.attempts} times "
                                 f"(worker.max_attempts = {max_attempts}); not retried")
                    job.finished_at = now
                    failed += 1
                    s.execute(update(Series).where(Series.id == job.series_id,
                                                   Series.state == SeriesState.PROCESSING.value)
                              .values(state=SeriesState.FAILED.value, updated_at=now))
                else:
                    job.state = JobState.QUEUED.value
                    requeued += 1
                    s.execute(update(Series).where(Series.id == job.series_id,
                                                   Series.state == SeriesState.PROCESSING.value)
                              .values(state=SeriesState.QUEUED.value, updated_at=now))
        return requeued, failed
