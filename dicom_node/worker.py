"""Worker: claims queued jobs, loads the series, runs the analysis, stores the results.

Per job (docs/internal-interfaces.md): ``pipeline.series_loader.load_series`` ->
``pipeline.run.analyse(series, device=...)`` -> ``summary.json`` in the store (a ``summary``
result row) -> ``dicom_node.results.publish(...)`` (SEG, SR, key image and their deliveries).
Any failure ends the job ``failed`` with a sentence a person understands; the worker goes on.
"""
from __future__ import annotations

import importlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from config import Settings
from dicom_node import audit, metrics
from dicom_node.logging import get_logger
from storage.files import BlobStore
from storage.index import Index
from storage.models import JobState, ResultKind
from storage.queue import JobQueue, JobRef, new_worker_id

log = get_logger("spine_node.worker")

MAX_ERROR_CHARS = 2000


class JobFailed(Exception):
    """A job cannot be completed; the message goes to ``jobs.error`` as it is."""


def _entry_point(module: str, attr: str, what: str):
    """``module.attr`` (the configured ``pipeline.entry_point``); a job that cannot import it
    fails with the reason, it never ends ``done`` without results."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise JobFailed(f"{what} cannot be imported: {exc}") from exc
    fn = getattr(mod, attr, None)
    if fn is None:
        raise JobFailed(f"{what}: {module}.{attr} does not exist")
    return fn


def _over_budget(paths: list, slices: int, budget_mb: float) -> str | None:
    """Why a series is too large for ``pipeline.memory_budget_mb`` (:mod:`pipeline.memory`),
    from one header; None where it fits or the header cannot tell."""
    import pydicom

    from pipeline.memory import SeriesSize, over_budget

    try:
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        row_mm, col_mm = (float(v) for v in ds.get("PixelSpacing", (1.0, 1.0)))
        step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    except (OSError, ValueError, TypeError, AttributeError, pydicom.errors.InvalidDicomError):
        return None  # the loader gives the reason
    size = SeriesSize(rows, cols, slices, (cols * col_mm, rows * row_mm, slices * abs(step)))
    return over_budget(size, budget_mb)


class Worker:
    """One job at a time; :meth:`run` loops until ``stop`` is set."""

    def __init__(self, settings: Settings, index: Index, queue: JobQueue, store: BlobStore, *,
                 analyse: Callable[..., Any] | None = None,
                 publish: Callable[..., Any] | None = None, worker_id: str | None = None):
        self.settings = settings
        self.index = index
        self.queue = queue
        self.store = store
        self._analyse = analyse
        self._publish = publish
        self.worker_id = worker_id or new_worker_id()
        self.current: JobRef | None = None
        self.stop = threading.Event()

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("worker started", extra={"worker": self.worker_id})
        while not self.stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("worker loop error")
                busy = False
            if not busy:
                self.stop.wait(self.settings.worker.poll_seconds)
        log.info("worker stopped", extra={"worker": self.worker_id})

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue was empty."""
        job = self.queue.claim(self.worker_id)
        if job is None:
            return False
        self.current = job
        try:
            self.process(job)
        finally:
            self.current = None
        return True

    # -- one job ---------------------------------------------------------------------------
    def process(self, job: JobRef) -> JobState:
        started = time.monotonic()
        log.info("job started", extra={"job_id": job.id, "version": job.version,
                                       "series_uid": job.series_instance_uid,
                                       "attempt": job.attempts})
        audit.record(self.index, "job_started", "success", actor=self.worker_id,
                     study_instance_uid=job.study_instance_uid,
                     series_instance_uid=job.series_instance_uid, job_id=job.id,
                     version=job.version, attempt=job.attempts)
        state, error = JobState.DONE, None
        try:
            self._run(job)
        except JobFailed as exc:
            state, error = JobState.FAILED, str(exc)
        except Exception as exc:
            log.exception("job raised", extra={"job_id": job.id})
            state, error = JobState.FAILED, f"unexpected error: {type(exc).__name__}: {exc}"
        if error and len(error) > MAX_ERROR_CHARS:
            error = error[:MAX_ERROR_CHARS - 3] + "..."
        if not self.queue.finish(job.id, state, error, worker_id=self.worker_id):
            log.warning("job was taken from this worker (re-queued); result not recorded",
                        extra={"job_id": job.id})
        seconds = time.monotonic() - started
        metrics.JOB_SECONDS.labels(state.value).observe(seconds)
        log.info("job finished", extra={"job_id": job.id, "state": state.value,
                                        "seconds": round(seconds, 3), "error": error})
        audit.record(self.index, "job_finished", state.value, actor=self.worker_id,
                     study_instance_uid=job.study_instance_uid,
                     series_instance_uid=job.series_instance_uid, job_id=job.id,
                     version=job.version, seconds=round(seconds, 3), reason=error)
        return state

    def _run(self, job: JobRef) -> None:
        from pipeline.series_loader import SeriesLoadError, load_series

        instances = self.index.series_instances(job.series_instance_uid)
        if not instances:
            raise JobFailed("the series has no stored instances")
        paths = [self.store.path(inst.path) for inst in instances]
        budget = self.settings.pipeline.memory_budget_mb
        if budget:
            reason = _over_budget(paths, sum(max(1, int(i.frames or 1)) for i in instances), budget)
            if reason:
                raise JobFailed(reason)
        try:
            series = load_series(paths)
        except SeriesLoadError as exc:
            raise JobFailed(f"cannot load the series: {exc}") from exc

        module, _, attr = self.settings.pipeline.entry_point.partition(":")
        analyse = self._analyse or _entry_point(module, attr, f"the analysis pipeline ({module})")
        try:
            result = analyse(series, device=self.settings.pipeline.device)
        except (ValueError, RuntimeError, OSError) as exc:
            raise JobFailed(f"analysis failed: {type(exc).__name__}: {exc}") from exc

        summary = result.summary()
        from dicom_node.results import study_context

        # Where this result stands in its study: one part of several, or replacing an earlier
        # answer (issue 27); said in summary.json and in the SR.
        context = study_context(job=job, series=series, index=self.index, store=self.store)
        if context.says_anything:
            summary["study"] = context.summary()
        relpath = self.store.result_relpath(job.study_instance_uid, job.series_instance_uid,
                                            job.version, job.id, "summary.json")
        self.store.write_atomic(relpath, json.dumps(summary, indent=2).encode())
        self.index.add_result(job.id, ResultKind.SUMMARY.value, relpath,
                              series_instance_uid=job.series_instance_uid)

        from dicom_node.results import publish as publish_results

        publish = self._publish or publish_results
        try:
            publish(job=job, series=series, result=result, index=self.index,
                    store=self.store, settings=self.settings, context=context)
        except ValueError as exc:  # e.g. nothing to build: no vertebra found
            raise JobFailed(f"results not published: {exc}") from exc


class Heartbeat:
    """The lease of running jobs (``worker.lease_seconds``): every lease/5 seconds the jobs
    of this process's workers get a fresh ``updated_at``, and running jobs of any process or
    machine whose heartbeat is older than the lease are queued again (their worker died),
    so a shared PostgreSQL queue never keeps a job stuck on a dead machine."""

    def __init__(self, workers: list[Worker], queue: JobQueue, settings: Settings):
        self.workers = workers
        self.queue = queue
        self.lease_s = float(settings.worker.lease_seconds)
        self.max_attempts = settings.worker.max_attempts
        self.thread = threading.Thread(target=self.run, name="job-heartbeat", daemon=True)

    def beat(self) -> tuple[int, int]:
        self.queue.heartbeat(w.worker_id for w in self.workers if w.current is not None)
        requeued, failed = self.queue.requeue_running(max_attempts=self.max_attempts,
                                                      stale_after_s=self.lease_s)
        if requeued or failed:
            log.warning("jobs of a stopped worker re-queued (heartbeat older than "
                        "worker.lease_seconds)", extra={"jobs_requeued": requeued,
                                                        "jobs_failed": failed})
        return requeued, failed

    def run(self) -> None:
        interval = self.lease_s / 5
        next_beat = time.monotonic() + interval
        while not all(w.stop.is_set() for w in self.workers):
            time.sleep(0.2)
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + interval
            try:
                self.beat()
            except Exception:
                log.exception("job heartbeat failed")


def start_worker_threads(worker_factory: Callable[[], Worker], count: int) -> list[
        tuple[Worker, threading.Thread]]:
    out = []
    for k in range(count):
        worker = worker_factory()
        thread = threading.Thread(target=worker.run, name=f"worker-{k}", daemon=True)
        thread.start()
        out.append((worker, thread))
    if out:
        first = out[0][0]
        Heartbeat([w for w, _ in out], first.queue, first.settings).thread.start()
    return out


def drain_workers(workers: list[tuple[Worker, threading.Thread]], queue: JobQueue,
                  timeout_s: float) -> None:
    """Ask the workers to stop; a job still running after ``timeout_s`` is re-queued."""
    for worker, _ in workers:
        worker.stop.set()
    deadline = time.monotonic() + timeout_s
    for worker, thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
        job = worker.current
        if thread.is_alive() and job is not None:
            queue.requeue(job.id, "")
            log.warning("job re-queued at shutdown", extra={"job_id": job.id})
