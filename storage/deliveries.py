"""The delivery queue: one row per result object and destination, until the destination has
accepted it (DESIGN.md "Data flow": export queue, retried with backoff).

A row is ``pending`` and due at ``next_attempt_at``; the exporter claims due rows, sends them and
records the outcome: ``delivered``, or a failure that pushes ``next_attempt_at`` back by an
exponential backoff (``backoff_start_s * backoff_factor ** (attempts - 1)``, at most
``backoff_max_s``) until ``max_attempts`` failures make it ``dead`` (the dead-letter state that
``spine-node resend`` revives). All state is in the database, so deliveries survive restarts.

Claims are leases: claiming moves ``next_attempt_at`` forward by the lease, so an exporter that
dies mid-send leaves rows that become due again once the lease ends, and two exporters never
send the same row at the same time (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: one
``UPDATE ... RETURNING`` statement under the database write lock).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, func, select, update

from storage.db import Database, utcnow
from storage.models import Delivery, DeliveryState, Job, JobState, Result, ResultKind
from storage.queue import claimer_is_dead, host_prefix

#: Result kinds that are DICOM objects and so can be delivered (summary.json stays local).
DELIVERABLE_KINDS = (ResultKind.SEG.value, ResultKind.SR.value, ResultKind.KEY_IMAGE.value)


@dataclass(frozen=True)
class Backoff:
    """Retry policy (the ``[exporter]`` settings ``backoff_start_s``, ``backoff_factor``,
    ``backoff_max_s``, ``max_attempts``)."""

    start_s: float = 30.0
    factor: float = 2.0
    max_s: float = 3600.0
    max_attempts: int = 10

    @classmethod
    def from_settings(cls, exporter) -> "Backoff":
        return cls(start_s=exporter.backoff_start_s, factor=exporter.backoff_factor,
                   max_s=exporter.backoff_max_s, max_attempts=exporter.max_attempts)

    def delay_s(self, failures: int) -> float:
        """Wait after the ``failures``-th consecutive failure (1 = the first)."""
        try:
            delay = self.start_s * self.factor ** max(0, failures - 1)
        except OverflowError:
            return self.max_s
        return min(self.max_s, delay)


@dataclass(frozen=True)
class NewResult:
    """A result file to record for a job (``kind``: a :class:`storage.models.ResultKind` value)."""

    kind: str
    path: str
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class DestinationWants:
    """A destination's name and the result kinds it takes (``[[destinations]] objects``)."""

    name: str
    objects: tuple[str, ...] = DELIVERABLE_KINDS

    @classmethod
    def from_settings(cls, destinations: Iterable) -> list["DestinationWants"]:
        return [cls(d.name, tuple(d.objects)) for d in destinations]


@dataclass(frozen=True)
class ClaimedDelivery:
    """A claimed delivery with what the SCU needs to send it."""

    id: int
    result_id: int
    destination: str
    attempts: int
    kind: str
    path: str
    sop_instance_uid: str | None


@dataclass(frozen=True)
class FailureOutcome:
    state: DeliveryState
    attempts: int
    next_attempt_at: dt.datetime | None


def _insert(db: Database):
    if db.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert


class DeliveryQueue:
    """Delivery rows of :class:`storage.models.Delivery`; each method is one short transaction."""

    def __init__(self, db: Database):
        self.db = db
        self._insert = _insert(db)

    # -- creating --------------------------------------------------------------------------
    def _enqueue_rows(self, s, rows: Sequence[tuple[int, str]],
                      now: dt.datetime) -> int:
        if not rows:
            return 0
        stmt = self._insert(Delivery).values([
            dict(result_id=rid, destination=dest, state=DeliveryState.PENDING.value, attempts=0,
                 next_attempt_at=now, created_at=now, updated_at=now) for rid, dest in rows])
        stmt = stmt.on_conflict_do_nothing(index_elements=["result_id", "destination"])
        return s.execute(stmt).rowcount or 0

    @staticmethod
    def _pairs(results: Iterable[tuple[int, str]], destinations: Sequence[DestinationWants]
               ) -> list[tuple[int, str]]:
        return [(rid, d.name) for rid, kind in results for d in destinations
                if kind in DELIVERABLE_KINDS and kind in d.objects]

    def add_results(self, job_id: int, results: Sequence[NewResult],
                    destinations: Sequence[DestinationWants]) -> list[int]:
        """Record a job's result files and enqueue their deliveries, in one transaction.

        A result already recorded for the job under the same path (a publish repeated after a
        crash) is reused, not duplicated. Returns the result ids in the order given.
        """
        now = utcnow()
        with self.db.session() as s, s.begin():
            known = {r.path: r for r in s.scalars(select(Result).where(Result.job_id == job_id))}
            ids: list[tuple[int, str]] = []
            for r in results:
                row = known.get(r.path)
                if row is None:
                    row = Result(job_id=job_id, kind=r.kind, path=r.path,
                                 sop_instance_uid=r.sop_instance_uid,
                                 series_instance_uid=r.series_instance_uid, created_at=now)
                    s.add(row)
                    s.flush()
                ids.append((row.id, row.kind))
            self._enqueue_rows(s, self._pairs(ids, destinations), now)
        return [rid for rid, _ in ids]

    def enqueue(self, result_ids: Sequence[int], destinations: Sequence[DestinationWants]) -> int:
        """Enqueue deliveries of existing results to destinations (respecting what each wants);
        existing (result, destination) rows are left as they are. Returns how many were new."""
        now = utcnow()
        with self.db.session() as s, s.begin():
            kinds = s.execute(select(Result.id, Result.kind).where(Result.id.in_(list(result_ids))))
            return self._enqueue_rows(s, self._pairs(list(kinds), destinations), now)

    # -- sending ---------------------------------------------------------------------------
    def claim_due(self, destination: str, *, limit: int = 16, lease_s: float = 300.0,
                  now: dt.datetime | None = None, claimed_by: str | None = None,
                  ) -> list[ClaimedDelivery]:
        """Claim up to ``limit`` due pending deliveries to ``destination``, oldest first.

        The claim moves their ``next_attempt_at`` ``lease_s`` ahead: if this process dies, they
        are due again after the lease; until then no other exporter takes them. ``claimed_by``
        (``storage.queue.new_worker_id``) lets a restart on the same host release the claims
        of its dead predecessor at once (:meth:`release_dead_local`).
        """
        now = now or utcnow()
        until = now + dt.timedelta(seconds=lease_s)
        due = (select(Delivery.id).where(Delivery.destination == destination,
                                         Delivery.state == DeliveryState.PENDING.value,
                                         Delivery.next_attempt_at <= now)
               .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit))
        with self.db.session() as s, s.begin():
            if not self.db.is_sqlite:
                due = due.with_for_update(skip_locked=True)
            ids = list(s.scalars(due)) if not self.db.is_sqlite else None
            cond = (Delivery.id.in_(ids) if ids is not None
                    else Delivery.id.in_(due.scalar_subquery()))
            claimed = s.execute(
                update(Delivery)
                .where(cond, Delivery.state == DeliveryState.PENDING.value,
                       Delivery.next_attempt_at <= now)
                .values(next_attempt_at=until, updated_at=now, claimed_by=claimed_by)
                .returning(Delivery.id)).scalars().all()
            if not claimed:
                return []
            rows = s.execute(
                select(Delivery.id, Delivery.result_id, Delivery.destination, Delivery.attempts,
                       Result.kind, Result.path, Result.sop_instance_uid)
                .join(Result, Result.id == Delivery.result_id)
                .where(Delivery.id.in_(list(claimed)))
                .order_by(Delivery.id)).all()
        return [ClaimedDelivery(*row) for row in rows]

    def mark_delivered(self, delivery_id: int) -> None:
        now = utcnow()
        with self.db.session() as s, s.begin():
            s.execute(update(Delivery).where(Delivery.id == delivery_id).values(
                state=DeliveryState.DELIVERED.value, delivered_at=now, updated_at=now,
                last_error=None, claimed_by=None))

    def record_failure(self, delivery_id: int, error: str, backoff: Backoff, *,
                       now: dt.datetime | None = None) -> FailureOutcome:
        """Record a failed attempt: due again after the backoff, or ``dead`` once it failed
        ``backoff.max_attempts`` times."""
        now = now or utcnow()
        with self.db.session() as s, s.begin():
            row = s.get(Delivery, delivery_id, with_for_update=not self.db.is_sqlite)
            if row is None or row.state != DeliveryState.PENDING.value:
                state = DeliveryState(row.state) if row is not None else DeliveryState.DEAD
                return FailureOutcome(state, row.attempts if row else 0, None)
            row.attempts += 1
            row.claimed_by = None
            row.last_error = error[:2000]
            row.updated_at = now
            if row.attempts >= backoff.max_attempts:
                row.state = DeliveryState.DEAD.value
                return FailureOutcome(DeliveryState.DEAD, row.attempts, None)
            row.next_attempt_at = now + dt.timedelta(seconds=backoff.delay_s(row.attempts))
            return FailureOutcome(DeliveryState.PENDING, row.attempts, row.next_attempt_at)

    def release(self, delivery_ids: Iterable[int], *, now: dt.datetime | None = None) -> None:
        """Give claimed, unsent deliveries back (due now), e.g. when the exporter stops."""
        ids = list(delivery_ids)
        if not ids:
            return
        now = now or utcnow()
        with self.db.session() as s, s.begin():
            s.execute(update(Delivery).where(Delivery.id.in_(ids),
                                             Delivery.state == DeliveryState.PENDING.value)
                      .values(next_attempt_at=now, updated_at=now, claimed_by=None))

    def release_dead_local(self, *, now: dt.datetime | None = None) -> int:
        """Release at once the claims of exporters of this host that no longer run (a node
        that crashed and restarts); returns how many. Safe on a queue shared with other
        processes and machines: a claim of a live process, or of another host, is left to
        its lease."""
        now = now or utcnow()
        with self.db.session() as s, s.begin():
            q = select(Delivery).where(Delivery.state == DeliveryState.PENDING.value,
                                       Delivery.claimed_by.like(f"{host_prefix()}%"))
            if not self.db.is_sqlite:
                q = q.with_for_update(skip_locked=True)
            released = 0
            for row in s.scalars(q):
                if claimer_is_dead(row.claimed_by):
                    row.claimed_by = None
                    row.next_attempt_at = now
                    row.updated_at = now
                    released += 1
            return released

    def due_now(self, *, now: dt.datetime | None = None) -> int:
        """Make every pending delivery due now; returns how many were waiting.

        For the start of the only exporter of a database (SQLite: one node): leases it held
        when it died are released at once instead of after ``lease_s``, and deliveries waiting
        out a backoff are tried once more (a restart is when an operator expects that).
        Delivery stays at-least-once: an object the destination accepted just before the
        crash is sent again under its same SOP Instance UID, which a PACS stores once."""
        now = now or utcnow()
        with self.db.session() as s, s.begin():
            return s.execute(update(Delivery).where(
                Delivery.state == DeliveryState.PENDING.value,
                Delivery.next_attempt_at > now).values(next_attempt_at=now, updated_at=now,
                                                       claimed_by=None)).rowcount or 0

    def next_due_at(self, destination: str) -> dt.datetime | None:
        """When the next pending delivery to ``destination`` is due (None: nothing pending)."""
        with self.db.session() as s:
            return s.scalar(select(func.min(Delivery.next_attempt_at)).where(
                Delivery.destination == destination,
                Delivery.state == DeliveryState.PENDING.value))

    # -- operators -------------------------------------------------------------------------
    def resend(self, study_instance_uid: str, destinations: Sequence[DestinationWants], *,
               all_versions: bool = False) -> int:
        """``spine-node resend STUDY_UID``: deliver the study's results again.

        Every delivery of the latest done version of each series of the study (all versions
        with ``all_versions``) becomes pending, with no attempts used and due now, whatever its
        state (delivered, dead or pending); destinations configured since the results were made
        get their rows too. Returns how many deliveries are now pending.
        """
        now = utcnow()
        with self.db.session() as s, s.begin():
            jobs = select(Job.id, Job.series_id, Job.version).where(
                Job.study_instance_uid == study_instance_uid, Job.state == JobState.DONE.value)
            if not all_versions:
                latest = (select(Job.series_id, func.max(Job.version).label("v"))
                          .where(Job.study_instance_uid == study_instance_uid,
                                 Job.state == JobState.DONE.value)
                          .group_by(Job.series_id).subquery())
                jobs = jobs.join(latest, and_(latest.c.series_id == Job.series_id,
                                              latest.c.v == Job.version))
            job_ids = [row.id for row in s.execute(jobs)]
            if not job_ids:
                return 0
            results = list(s.execute(select(Result.id, Result.kind)
                                     .where(Result.job_id.in_(job_ids))))
            self._enqueue_rows(s, self._pairs(results, destinations), now)
            wanted = {d.name for d in destinations}
            cond = [Delivery.result_id.in_([rid for rid, _ in results])]
            if wanted:
                cond.append(Delivery.destination.in_(sorted(wanted)))
            return s.execute(update(Delivery).where(*cond).values(
                state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=now,
                last_error=None, delivered_at=None, updated_at=now)).rowcount or 0

    def counts(self) -> dict[str, int]:
        """Deliveries per state (for /metrics)."""
        with self.db.session() as s:
            rows = s.execute(select(Delivery.state, func.count()).group_by(Delivery.state))
            return {state: int(n) for state, n in rows}

    def for_study(self, study_instance_uid: str) -> list[dict]:
        """Deliveries of a study's results (for ``spine-node jobs`` style listings and tests)."""
        with self.db.session() as s:
            rows = s.execute(
                select(Delivery.id, Delivery.destination, Delivery.state, Delivery.attempts,
                       Delivery.last_error, Result.kind, Result.sop_instance_uid, Job.version)
                .join(Result, Result.id == Delivery.result_id)
                .join(Job, Job.id == Result.job_id)
                .where(Job.study_instance_uid == study_instance_uid)
                .order_by(Delivery.id)).all()
        return [dict(id=r.id, destination=r.destination, state=r.state, attempts=r.attempts,
                     last_error=r.last_error, kind=r.kind, sop_instance_uid=r.sop_instance_uid,
                     version=r.version) for r in rows]
