"""The index: what the node holds (studies, series, instances), the jobs made of them, their
results, and the audit trail. A narrow API over :mod:`storage.models` (Orthanc's "index" beside
the "storage area" of :mod:`storage.files`), so the rest of the node never writes SQL.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from storage.db import Database, utcnow
from storage.models import (
    AuditEvent,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    Study,
)
from storage.prepared import PreparedStatement


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP learned about one received instance (UIDs already validated)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    path: str
    size_bytes: int
    instance_number: int | None = None
    frames: int = 1
    calling_ae: str = ""


@dataclass(frozen=True)
class StableSeries:
    id: int
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    instances: int
    frames: int
    last_received_at: dt.datetime
    #: The series' state, and the state of its newest job (None: never scheduled).
    state: str = SeriesState.RECEIVING.value
    last_job_state: str | None = None

    @property
    def pending(self) -> bool:
        """Waiting for a decision (new, or re-opened by a late instance)."""
        return self.state == SeriesState.RECEIVING.value

    @property
    def was_chosen(self) -> bool:
        """Its newest job analyses it (queued, running, done or failed), not skipped."""
        return self.last_job_state not in (None, JobState.SKIPPED.value)


#: The parameters of the instance insert (storage.prepared compiles it with these).
_INSTANCE_KEYS = ["series_id", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid",
                  "instance_number", "frames", "path", "size_bytes", "calling_ae", "received_at"]


def _insert(db: Database):
    if db.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert


class Index:
    """Index operations; each method is one short transaction."""

    _CACHE_MAX = 4096

    def __init__(self, db: Database):
        self.db = db
        self._insert = _insert(db)
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._insert_instance = self._insert(Instance).on_conflict_do_nothing(
            index_elements=["sop_instance_uid"])
        self._touch_series = update(Series).where(Series.id == bindparam("sid")).values(
            last_received_at=bindparam("now"), updated_at=bindparam("now"),
            state=SeriesState.RECEIVING.value)
        self._instance_path = select(Instance.path).where(
            Instance.sop_instance_uid == bindparam("sop"))
        self._lock = threading.Lock()
        # add_instances on SQLite: one connection kept for it (no pool checkout per group)
        # and its two statements run on the DB-API cursor (storage.prepared).
        self._writer_lock = threading.Lock()
        self._writer_conn = None
        self._fast = None
        if db.is_sqlite:
            dialect = db.engine.dialect
            self._fast = (PreparedStatement(self._insert_instance, dialect, _INSTANCE_KEYS),
                          PreparedStatement(self._touch_series, dialect, ["sid", "now"]))

    # -- receiving -------------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(Instance.id).where(
                Instance.sop_instance_uid == sop_instance_uid)) is not None

    def instance_path(self, sop_instance_uid: str) -> str | None:
        with self.db.engine.connect() as conn:
            return conn.scalar(select(Instance.path).where(
                Instance.sop_instance_uid == sop_instance_uid))

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Index a stored instance; True if it is new (False: the SOP Instance UID was known).

        Any instance re-opens its series (state ``receiving``), so that an instance arriving
        after processing leads to a new job version, never to a silent split.
        """
        return self.add_instances([rec])[0]

    def add_instances(self, records: list[InstanceRecord],
                      before_commit: Callable[[list[bool], list[str | None]], None] | None = None,
                      ) -> list[bool]:
        """Index several stored instances in one transaction (one commit, so one WAL sync for
        the lot: the group commit of :mod:`storage.ingest`); per record, True if it is new.

        ``before_commit(new, known_paths)`` runs inside the transaction, after the inserts and
        before the commit; ``known_paths[i]`` is the path already indexed for a record that
        was not new (``None`` for a new one). :mod:`storage.ingest` names its files there, so
        that the duplicate check costs no query of its own and a row is never committed before
        its file is in place.

        Core statements on one connection, no ORM unit of work: this runs once per received
        instance and its CPU time is on the C-STORE's critical path.
        """
        if not records:
            return []
        with self._writer_lock:
            try:
                return self._add_instances(records, use_cache=True, before_commit=before_commit)
            except (IntegrityError, sqlite3.IntegrityError):
                # A cached study/series id whose row is gone: forget the ids, look them up again.
                with self._lock:
                    self._study_ids.clear()
                    self._series_ids.clear()
                return self._add_instances(records, use_cache=False,
                                           before_commit=before_commit)

    @contextlib.contextmanager
    def _connection(self):
        """The connection of :meth:`add_instances`: on SQLite the kept one (dropped after an
        error, so that the next group starts afresh); on other databases one from the pool
        each time, whose pre-ping finds a connection that a server restart broke."""
        if not self._fast:
            with self.db.engine.connect() as conn:
                yield conn
            return
        conn = self._writer()
        try:
            yield conn
        except BaseException:
            self._drop_writer()
            raise

    def _writer(self):
        """The connection kept for :meth:`add_instances` (callers hold ``_writer_lock``)."""
        if self._writer_conn is None or self._writer_conn.closed or self._writer_conn.invalidated:
            self._writer_conn = self.db.engine.connect()
        return self._writer_conn

    def _drop_writer(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection is dropped either way
                pass

    def close(self) -> None:
        """Return the kept writer connection to the pool (e.g. before the engine is disposed)."""
        with self._writer_lock:
            self._drop_writer()

    def _add_instances(self, records: list[InstanceRecord], *, use_cache: bool,
                       before_commit: Callable[[list[bool], list[str | None]], None] | None,
                       ) -> list[bool]:
        now = utcnow()
        new: list[bool] = []
        series_ids: dict[str, int] = {}
        study_ids: dict[str, int] = {}
        touched: set[int] = set()
        with self._connection() as conn, conn.begin():
            ins = self._insert
            cursor = conn.connection.driver_connection.cursor() if self._fast else None
            for rec in records:
                series_id = series_ids.get(rec.series_instance_uid)
                if series_id is None and use_cache:
                    series_id = self._series_ids.get(rec.series_instance_uid)
                if series_id is None:
                    study_id = self._study_ids.get(rec.study_instance_uid) if use_cache \
                        else None
                    if study_id is None:
                        conn.execute(ins(Study).values(
                            study_instance_uid=rec.study_instance_uid, created_at=now,
                            updated_at=now).on_conflict_do_nothing(
                                index_elements=["study_instance_uid"]))
                        study_id = conn.scalar(select(Study.id).where(
                            Study.study_instance_uid == rec.study_instance_uid))
                    conn.execute(ins(Series).values(
                        study_id=study_id, series_instance_uid=rec.series_instance_uid,
                        modality=rec.modality[:16], state=SeriesState.RECEIVING.value,
                        first_received_at=now, last_received_at=now, updated_at=now)
                        .on_conflict_do_nothing(index_elements=["series_instance_uid"]))
                    series_id = conn.scalar(select(Series.id).where(
                        Series.series_instance_uid == rec.series_instance_uid))
                    study_ids[rec.study_instance_uid] = study_id
                series_ids[rec.series_instance_uid] = series_id
                # One prepared statement, parameters apart: no per-row statement building.
                values = {
                    "series_id": series_id, "sop_instance_uid": rec.sop_instance_uid,
                    "sop_class_uid": rec.sop_class_uid,
                    "transfer_syntax_uid": rec.transfer_syntax_uid,
                    "instance_number": rec.instance_number,
                    "frames": max(1, int(rec.frames or 1)), "path": rec.path,
                    "size_bytes": rec.size_bytes, "calling_ae": rec.calling_ae[:16],
                    "received_at": now}
                if self._fast:
                    rowcount = self._fast[0].execute(cursor, values)
                else:
                    rowcount = conn.execute(self._insert_instance, values).rowcount
                is_new = bool(rowcount)
                new.append(is_new)
                if is_new:
                    touched.add(series_id)
            for series_id in touched:
                if self._fast:
                    self._fast[1].execute(cursor, {"sid": series_id, "now": now})
                else:
                    conn.execute(self._touch_series, {"sid": series_id, "now": now})
            if before_commit is not None:
                known = [None if is_new else conn.scalar(self._instance_path,
                                                         {"sop": rec.sop_instance_uid})
                         for rec, is_new in zip(records, new)]
                before_commit(new, known)
        # Cache ids only once their rows are committed.
        with self._lock:
            if len(self._study_ids) > self._CACHE_MAX:
                self._study_ids.clear()
            if len(self._series_ids) > self._CACHE_MAX:
                self._series_ids.clear()
            self._study_ids.update(study_ids)
            self._series_ids.update(series_ids)
        return new

    # -- reading ---------------------------------------------------------------------------
    def series_instances(self, series_instance_uid: str) -> list[Instance]:
        """The series' instances, in instance-number order (the loader sorts by position)."""
        with self.db.session() as s:
            return list(s.scalars(
                select(Instance).join(Series, Series.id == Instance.series_id)
                .where(Series.series_instance_uid == series_instance_uid)
                .order_by(Instance.instance_number, Instance.id)))

    def studies(self, study_instance_uid: str | None = None) -> list[dict[str, Any]]:
        """``studies --json`` (DESIGN.md contract), plus per series ``chosen`` (its newest job
        analyses it) and ``reason`` (why chosen or skipped; None while undecided)."""
        with self.db.session() as s:
            counts = dict(s.execute(select(Instance.series_id, func.count(Instance.id))
                                    .group_by(Instance.series_id)).all())
            newest = {series_id: (state, reason, error) for series_id, state, reason, error in
                      s.execute(select(Job.series_id, Job.state, Job.reason, Job.error)
                                .order_by(Job.id))}
            q = (select(Study.study_instance_uid, Series.id, Series.series_instance_uid,
                        Series.modality, Series.state)
                 .join(Series, Series.study_id == Study.id)
                 .order_by(Study.id, Series.id))
            if study_instance_uid:
                q = q.where(Study.study_instance_uid == study_instance_uid)
            out: dict[str, dict[str, Any]] = {}
            for study_uid, series_id, series_uid, modality, state in s.execute(q):
                entry = out.setdefault(study_uid, {"study_instance_uid": study_uid,
                                                   "series": []})
                job_state, reason, error = newest.get(series_id, (None, None, None))
                entry["series"].append({"series_instance_uid": series_uid,
                                        "modality": modality,
                                        "instances": int(counts.get(series_id, 0)),
                                        "state": state,
                                        "chosen": job_state not in (None,
                                                                    JobState.SKIPPED.value),
                                        "reason": reason or (error if job_state ==
                                                             JobState.SKIPPED.value else None)})
            return list(out.values())

    def jobs(self, study_instance_uid: str | None = None) -> list[Job]:
        with self.db.session() as s:
            q = select(Job).order_by(Job.id)
            if study_instance_uid:
                q = q.where(Job.study_instance_uid == study_instance_uid)
            return list(s.scalars(q))

    def job(self, job_id: int) -> Job | None:
        with self.db.session() as s:
            return s.get(Job, job_id)

    def job_counts(self) -> dict[str, int]:
        with self.db.session() as s:
            rows = s.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
        counts = {state.value: 0 for state in JobState}
        counts.update({state: int(n) for state, n in rows})
        return counts

    # -- scheduling ------------------------------------------------------------------------
    def stable_series(self, received_before: dt.datetime) -> list[StableSeries]:
        """Series still ``receiving`` whose last instance arrived before ``received_before``."""
        with self.db.session() as s:
            rows = s.execute(
                select(Series.id, Study.study_instance_uid, Series.series_instance_uid,
                       Series.modality, func.count(Instance.id),
                       func.coalesce(func.sum(Instance.frames), 0), Series.last_received_at)
                .join(Study, Study.id == Series.study_id)
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.state == SeriesState.RECEIVING.value,
                       Series.last_received_at <= received_before)
                .group_by(Series.id, Study.study_instance_uid, Series.series_instance_uid,
                          Series.modality, Series.last_received_at)
                .order_by(Series.last_received_at)).all()
        return [StableSeries(*row) for row in rows]

    def stable_studies(self, received_before: dt.datetime) -> list[list[StableSeries]]:
        """Studies with a series waiting for a decision (``receiving``) whose every series
        received its last instance before ``received_before``: each as all its series (the
        decided ones too, so that the ranking sees what was chosen before)."""
        with self.db.session() as s:
            pending = select(Series.study_id).where(Series.state == SeriesState.RECEIVING.value)
            # An arriving instance sets its series receiving: the state index finds them.
            busy = select(Series.study_id).where(Series.state == SeriesState.RECEIVING.value,
                                                 Series.last_received_at > received_before)
            rows = s.execute(
                select(Series.id, Study.study_instance_uid, Series.series_instance_uid,
                       Series.modality, func.count(Instance.id),
                       func.coalesce(func.sum(Instance.frames), 0), Series.last_received_at,
                       Series.state)
                .join(Study, Study.id == Series.study_id)
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id.in_(pending), Series.study_id.not_in(busy))
                .group_by(Series.id, Study.id, Study.study_instance_uid,
                          Series.series_instance_uid, Series.modality,
                          Series.last_received_at, Series.state)
                .order_by(Study.id, Series.id)).all()
            ids = [row[0] for row in rows]
            newest: dict[int, str] = {}
            if ids:
                newest = {series_id: state for series_id, state in s.execute(
                    select(Job.series_id, Job.state).where(Job.series_id.in_(ids))
                    .order_by(Job.id))}
        studies: dict[str, list[StableSeries]] = {}
        for row in rows:
            studies.setdefault(row[1], []).append(StableSeries(*row, newest.get(row[0])))
        return list(studies.values())

    def schedule_series(self, series: StableSeries, *, skip_reason: str | None,
                        reason: str | None = None) -> Job | None:
        """Turn a stable series into a job: ``queued``, or ``skipped`` with ``skip_reason``;
        ``reason`` says why the selection chose it (default: the skip reason).

        If a job of the series is still queued (not started) it already covers the new
        instances and is kept. Returns the new job, or None when nothing was created (a new
        instance arrived meanwhile, another scheduler won, or a queued job is kept).
        """
        now = utcnow()
        try:
            with self.db.session() as s, s.begin():
                queued = s.scalar(select(Job).where(Job.series_id == series.id,
                                                    Job.state == JobState.QUEUED.value))
                new_state = (SeriesState.SKIPPED if skip_reason and queued is None
                             else SeriesState.QUEUED)
                flipped = s.execute(update(Series).where(
                    Series.id == series.id, Series.state == SeriesState.RECEIVING.value,
                    Series.last_received_at == series.last_received_at).values(
                        state=new_state.value, updated_at=now)).rowcount
                if not flipped or queued is not None:
                    if queued is not None:
                        queued.instances = series.instances
                        queued.updated_at = now
                    return None
                version = (s.scalar(select(func.max(Job.version))
                                    .where(Job.series_id == series.id)) or 0) + 1
                job = Job(series_id=series.id, study_instance_uid=series.study_instance_uid,
                          series_instance_uid=series.series_instance_uid, version=version,
                          state=(JobState.SKIPPED if skip_reason else JobState.QUEUED).value,
                          error=skip_reason, attempts=0, instances=series.instances,
                          reason=reason or skip_reason, created_at=now, updated_at=now,
                          finished_at=now if skip_reason else None)
                s.add(job)
            return job
        except IntegrityError:  # another scheduler created this version first
            return None

    def supersede_series(self, series_instance_uid: str, reason: str) -> Job | None:
        """A ``skipped`` job version for a series analysed before whose answer a late, better
        series of the same part replaces (issue 27; ``reason`` names that series): its
        results stay where they are, ``studies`` no longer shows it chosen. None where the
        series is unknown, has a queued or running job, or was re-opened by a new instance
        (the next decision sees it)."""
        now = utcnow()
        try:
            with self.db.session() as s, s.begin():
                series = s.scalar(select(Series).where(
                    Series.series_instance_uid == series_instance_uid))
                if series is None or series.state == SeriesState.RECEIVING.value:
                    return None
                if s.scalar(select(Job.id).where(Job.series_id == series.id, Job.state.in_(
                        (JobState.QUEUED.value, JobState.RUNNING.value)))):
                    return None
                version = (s.scalar(select(func.max(Job.version))
                                    .where(Job.series_id == series.id)) or 0) + 1
                instances = s.scalar(select(func.count(Instance.id))
                                     .where(Instance.series_id == series.id)) or 0
                study = s.scalar(select(Study.study_instance_uid)
                                 .where(Study.id == series.study_id))
                job = Job(series_id=series.id, study_instance_uid=study,
                          series_instance_uid=series_instance_uid, version=version,
                          state=JobState.SKIPPED.value, error=reason, attempts=0,
                          instances=int(instances), reason=reason, created_at=now,
                          updated_at=now, finished_at=now)
                s.add(job)
                series.state = SeriesState.SKIPPED.value
                series.updated_at = now
            return job
        except IntegrityError:  # another scheduler wrote this version first
            return None

    def rerun_study(self, study_instance_uid: str,
                    series_instance_uid: str | None = None) -> list[Job]:
        """A new queued job version for the series the selection chose in the study (those
        with a newest job that is not ``skipped``), or, with ``series_instance_uid``, for that
        series whatever the selection said (an operator's override)."""
        now = utcnow()
        created = []
        with self.db.session() as s, s.begin():
            q = (select(Series, func.count(Instance.id))
                 .join(Study, Study.id == Series.study_id)
                 .join(Instance, Instance.series_id == Series.id)
                 .where(Study.study_instance_uid == study_instance_uid)
                 .group_by(Series.id).order_by(Series.id))
            if series_instance_uid:
                q = q.where(Series.series_instance_uid == series_instance_uid)
            for series, n in s.execute(q).all():
                if s.scalar(select(Job.id).where(Job.series_id == series.id,
                                                 Job.state == JobState.QUEUED.value)):
                    continue
                newest = s.scalar(select(Job.state).where(Job.series_id == series.id)
                                  .order_by(Job.id.desc()).limit(1))
                if series_instance_uid is None and newest in (None, JobState.SKIPPED.value):
                    continue  # one study, one answer: skipped or undecided series wait
                version = (s.scalar(select(func.max(Job.version))
                                    .where(Job.series_id == series.id)) or 0) + 1
                reason = ("chosen by an operator: rerun --series (overrides the ranking)"
                          if series_instance_uid else "rerun of the chosen series")
                job = Job(series_id=series.id, study_instance_uid=study_instance_uid,
                          series_instance_uid=series.series_instance_uid, version=version,
                          state=JobState.QUEUED.value, attempts=0, instances=int(n),
                          reason=reason, created_at=now, updated_at=now)
                s.add(job)
                series.state = SeriesState.QUEUED.value
                series.updated_at = now
                created.append(job)
        return created

    # -- results and deliveries ------------------------------------------------------------
    def add_result(self, job_id: int, kind: str, path: str, *,
                   sop_instance_uid: str | None = None,
                   series_instance_uid: str | None = None) -> int:
        with self.db.session() as s, s.begin():
            row = Result(job_id=job_id, kind=kind, path=path, sop_instance_uid=sop_instance_uid,
                         series_instance_uid=series_instance_uid, created_at=utcnow())
            s.add(row)
            s.flush()
            return row.id

    def results(self, job_id: int) -> list[Result]:
        with self.db.session() as s:
            return list(s.scalars(select(Result).where(Result.job_id == job_id)
                                  .order_by(Result.id)))

    # -- audit -----------------------------------------------------------------------------
    def audit(self, event_type: str, actor: str, outcome: str,
              details: dict[str, Any] | None = None) -> None:
        """Append an audit event. ``details`` must not carry patient names or IDs."""
        with self.db.session() as s, s.begin():
            s.add(AuditEvent(ts=utcnow(), event_type=event_type, actor=actor[:128],
                             outcome=outcome, details=details or {}))

    def audit_events(self, limit: int = 100) -> list[AuditEvent]:
        with self.db.session() as s:
            return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())
                                  .limit(limit)))
