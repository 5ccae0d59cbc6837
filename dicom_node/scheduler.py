"""Scheduler: one study, one answer (DESIGN.md "Data flow", issue 27).

A study is stable when none of its series received an instance for
``scheduler.stable_seconds``. Then each of its new series goes through the selection rules
(:mod:`dicom_node.selection`, over the headers :mod:`dicom_node.series_facts` reads) and the
eligible ones are ranked (:mod:`dicom_node.ranking`): one ``queued`` job for the chosen series
(one per part of the spine that no other chosen series covers); every other series becomes a
``skipped`` job whose reason names the chosen series or the rule it failed.

An instance arriving after a series was processed sets it back to ``receiving``
(:meth:`storage.index.Index.add_instance`), so the next stable tick makes a new job version.
"""
from __future__ import annotations

import datetime as dt

from apscheduler.schedulers.background import BackgroundScheduler

from config import Settings
from config.settings import DERIVED_ATTRIBUTES
from dicom_node import audit
from dicom_node.logging import get_logger
from dicom_node.ranking import Decision, choose
from dicom_node.selection import Eligibility, SeriesFacts, evaluate
from dicom_node.series_facts import read_series_facts
from storage.db import utcnow
from storage.files import BlobStore
from storage.index import Index, StableSeries

log = get_logger("spine_node.scheduler")


def series_facts(index: Index, store: BlobStore, series: StableSeries,
                 settings: Settings) -> SeriesFacts:
    """The facts of one stable series, from the headers of its first and last instance."""
    slices = max(series.instances, series.frames)
    if (series.modality or "").upper() not in settings.selection.modalities:
        return SeriesFacts(series.series_instance_uid, series.modality, slices)
    keywords = [r.attribute for r in settings.selection.rules
                if r.attribute not in DERIVED_ATTRIBUTES]
    paths = [store.path(i.path) for i in index.series_instances(series.series_instance_uid)]
    return read_series_facts(series.series_instance_uid, series.modality, slices,
                             [paths[0], paths[-1]] if paths else [], keywords)


def decide_study(study: list[StableSeries], facts: dict[str, SeriesFacts],
                 settings: Settings) -> dict[str, tuple[str | None, str]]:
    """Per pending series of one stable study: (skip reason or None, reason)."""
    verdicts: dict[str, Eligibility] = {uid: evaluate(f, settings.selection)
                                        for uid, f in facts.items()}
    eligible = [facts[s.series_instance_uid] for s in study
                if s.pending and verdicts[s.series_instance_uid].eligible]
    # Chosen before (a re-opened one too, while still eligible): they keep their place.
    kept = [facts[s.series_instance_uid] for s in study if s.was_chosen and (
        not s.pending or verdicts[s.series_instance_uid].eligible)]
    decisions: dict[str, Decision] = {
        d.series_instance_uid: d for d in choose(eligible, settings.selection.kernels,
                                                 kept=kept)}
    analysed = list(dict.fromkeys([k.series_instance_uid for k in kept] + [
        d.series_instance_uid for d in decisions.values() if d.chosen]))
    # An ineligible series names the rules it failed, and the series analysed instead.
    instead = f"; series {', '.join(analysed)} {'is' if len(analysed) == 1 else 'are'} " \
        "analysed" if analysed else ""
    out: dict[str, tuple[str | None, str]] = {}
    for s in study:
        if not s.pending:
            continue
        uid = s.series_instance_uid
        if uid in decisions:
            d = decisions[uid]
            out[uid] = (None if d.chosen else d.reason, d.reason)
        else:
            reason = "; ".join(verdicts[uid].reasons) + instead
            out[uid] = (reason, reason)
    return out


def schedule_stable_series(index: Index, settings: Settings, now: dt.datetime | None = None,
                           store: BlobStore | None = None) -> list:
    """One scheduler pass over the stable studies; returns the jobs it created."""
    now = now or utcnow()
    store = store or BlobStore(settings.storage.root)
    cutoff = now - dt.timedelta(seconds=settings.scheduler.stable_seconds)
    created = []
    for study in index.stable_studies(cutoff):
        try:
            # Headers of the decided series too: the ranking must see what was chosen before.
            facts = {s.series_instance_uid: series_facts(index, store, s, settings)
                     for s in study if s.pending or s.was_chosen}
            decided = decide_study(study, facts, settings)
        except Exception:  # noqa: BLE001 - one study must not hold up the others
            log.exception("series selection failed", extra={
                "study_uid": study[0].study_instance_uid})
            continue
        for series in study:
            if series.series_instance_uid not in decided:
                continue
            skip, reason = decided[series.series_instance_uid]
            job = index.schedule_series(series, skip_reason=skip, reason=reason)
            if job is None:
                continue
            created.append(job)
            _record(index, settings, series, job, skip, reason)
    return created


def _record(index: Index, settings: Settings, series: StableSeries, job, skip: str | None,
            reason: str) -> None:  # noqa: ANN001 - a storage.models.Job
    # UIDs and rule texts only: no patient identifier reaches the log or the audit trail.
    log.info("series skipped" if skip else "job queued",
             extra={"job_id": job.id, "version": job.version,
                    "series_uid": series.series_instance_uid,
                    "instances": series.instances, "reason": reason})
    # ATNA "DICOM Instances Transferred": the series is complete (stable) at the node.
    audit.record(index, "study_received", "success", actor=settings.node.ae_title,
                 study_instance_uid=series.study_instance_uid,
                 series_instance_uid=series.series_instance_uid,
                 modality=series.modality, instances=series.instances, job_id=job.id,
                 job_state=job.state, reason=skip)


class Scheduler:
    """Runs :func:`schedule_stable_series` every ``scheduler.poll_seconds`` (APScheduler)."""

    def __init__(self, index: Index, settings: Settings, store: BlobStore | None = None):
        self.index = index
        self.settings = settings
        self.store = store or BlobStore(settings.storage.root)
        self._sched = BackgroundScheduler(timezone="UTC")
        self._sched.add_job(self.tick, "interval", seconds=settings.scheduler.poll_seconds,
                            id="stable-series", max_instances=1, coalesce=True,
                            next_run_time=dt.datetime.now(dt.timezone.utc))

    def tick(self) -> None:
        try:
            schedule_stable_series(self.index, self.settings, store=self.store)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("scheduler pass failed")

    def start(self) -> None:
        self._sched.start()

    def stop(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)
