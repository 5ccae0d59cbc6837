"""Scheduler: a series with no new instance for ``scheduler.stable_seconds`` goes through the
selection rules and becomes a ``queued`` job, or a ``skipped`` job that says why (DESIGN.md).

An instance arriving after a series was processed sets it back to ``receiving``
(:meth:`storage.index.Index.add_instance`), so the next stable tick makes a new job version.
"""
from __future__ import annotations

import datetime as dt

from apscheduler.schedulers.background import BackgroundScheduler

from config import Settings
from dicom_node import audit
from dicom_node.logging import get_logger
from storage.db import utcnow
from storage.index import Index, StableSeries

log = get_logger("spine_node.scheduler")


def skip_reason(series: StableSeries, settings: Settings) -> str | None:
    """Why the selection rules (``[selection]``) leave this series out, or None."""
    sel = settings.selection
    modality = (series.modality or "").upper()
    if modality not in sel.modalities:
        return (f"modality {modality or '(none)'} is not selected "
                f"(selection.modalities = {sel.modalities})")
    slices = max(series.instances, series.frames)
    if slices < sel.min_slices:
        return f"{slices} slices, fewer than selection.min_slices = {sel.min_slices}"
    return None


def schedule_stable_series(index: Index, settings: Settings, now: dt.datetime | None = None
                           ) -> list:
    """One scheduler pass; returns the jobs it created."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=settings.scheduler.stable_seconds)
    created = []
    for series in index.stable_series(cutoff):
        reason = skip_reason(series, settings)
        job = index.schedule_series(series, skip_reason=reason)
        if job is None:
            continue
        created.append(job)
        log.info("series skipped" if reason else "job queued",
                 extra={"job_id": job.id, "version": job.version,
                        "series_uid": series.series_instance_uid,
                        "instances": series.instances, "reason": reason})
        # ATNA "DICOM Instances Transferred": the series is complete (stable) at the node.
        audit.record(index, "study_received", "success", actor=settings.node.ae_title,
                     study_instance_uid=series.study_instance_uid,
                     series_instance_uid=series.series_instance_uid,
                     modality=series.modality, instances=series.instances, job_id=job.id,
                     job_state=job.state, reason=reason)
    return created


class Scheduler:
    """Runs :func:`schedule_stable_series` every ``scheduler.poll_seconds`` (APScheduler)."""

    def __init__(self, index: Index, settings: Settings):
        self.index = index
        self.settings = settings
        self._sched = BackgroundScheduler(timezone="UTC")
        self._sched.add_job(self.tick, "interval", seconds=settings.scheduler.poll_seconds,
                            id="stable-series", max_instances=1, coalesce=True,
                            next_run_time=dt.datetime.now(dt.timezone.utc))

    def tick(self) -> None:
        try:
            schedule_stable_series(self.index, self.settings)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("scheduler pass failed")

    def start(self) -> None:
        self._sched.start()

    def stop(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)
