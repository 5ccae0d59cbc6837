"""Scheduler: one study, one answer (DESIGN.md "Data flow", issue 27).

A study is stable when none of its series received an instance for
``scheduler.stable_seconds``. Then each of its new series goes through the selection rules
(:mod:`dicom_node.selection`, over the headers :mod:`dicom_node.series_facts` reads; then, for
a series the headers leave eligible, a look at a few slices for a spine,
:mod:`dicom_node.spine_coverage`) and the eligible ones are ranked (:mod:`dicom_node.ranking`):
one ``queued`` job for the chosen series (one per part of the spine that no other chosen
series covers); every other series becomes a ``skipped`` job whose reason names the chosen
series or the rule it failed.

An instance arriving after a series was processed sets it back to ``receiving``
(:meth:`storage.index.Index.add_instance`), so the next stable tick makes a new job version.
A better series arriving after its part was analysed is queued, and the series it supersedes
gets a ``skipped`` job version saying so (:meth:`storage.index.Index.supersede_series`); the
worker's result then says which answer it replaces (:func:`dicom_node.results.study_context`).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import replace

from apscheduler.schedulers.background import BackgroundScheduler

from config import Settings
from config.settings import DERIVED_ATTRIBUTES
from dicom_node import audit
from dicom_node.logging import get_logger
from dicom_node.ranking import Decision, choose, superseding_series
from dicom_node.selection import Eligibility, SeriesFacts, evaluate
from dicom_node.series_facts import read_series_facts
from dicom_node.spine_coverage import read_spine_coverage
from storage.db import utcnow
from storage.files import BlobStore
from storage.index import Index, StableSeries
from storage.models import JobState

log = get_logger("spine_node.scheduler")


def series_facts(index: Index, store: BlobStore, series: StableSeries,
                 settings: Settings) -> SeriesFacts:
    """The facts of one stable series, from the headers of its first and last instance; for
    a pending series that passes the rules, also what the spine check sees in a few slices
    (``selection.spine_check``)."""
    sel = settings.selection
    slices = max(series.instances, series.frames)
    if (series.modality or "").upper() not in sel.modalities:
        return SeriesFacts(series.series_instance_uid, series.modality, slices)
    keywords = [r.attribute for r in sel.rules if r.attribute not in DERIVED_ATTRIBUTES]
    paths = [store.path(i.path) for i in index.series_instances(series.series_instance_uid)]
    facts = read_series_facts(series.series_instance_uid, series.modality, slices,
                              [paths[0], paths[-1]] if paths else [], keywords)
    # Pixels are read only where the headers leave the series eligible, and only once: a
    # series chosen before keeps its place without a second look.
    if sel.spine_check and series.pending and evaluate(facts, sel).eligible:
        facts = _with_spine_check(facts, paths, settings)
    return facts


def _with_spine_check(facts: SeriesFacts, paths: list, settings: Settings) -> SeriesFacts:
    sel = settings.selection
    try:
        coverage = read_spine_coverage(paths, sel.spine_check_slices, sel.spine_min_fraction)
    except Exception as exc:  # noqa: BLE001 - pixels the check cannot read: the loader says why
        log.warning("spine check not done", extra={
            "series_uid": facts.series_instance_uid, "error": f"{type(exc).__name__}: {exc}"})
        return replace(facts, spine_detail=f"not checked: {type(exc).__name__}")
    if coverage is None:  # multi-frame or not axial: the rules decide alone
        return replace(facts, spine_detail="not checked: not axial single-frame images")
    return replace(facts, spine_in_view=coverage.in_view, spine_detail=coverage.detail)


def decide_study(study: list[StableSeries], facts: dict[str, SeriesFacts],
                 settings: Settings) -> dict[str, tuple[str | None, str]]:
    """Per pending series of one stable study: (skip reason or None, reason); and per series
    analysed before that a late, better one supersedes: (:data:`SUPERSEDED`, reason)."""
    verdicts: dict[str, Eligibility] = {uid: evaluate(f, settings.selection)
                                        for uid, f in facts.items()}
    eligible = [facts[s.series_instance_uid] for s in study
                if s.pending and verdicts[s.series_instance_uid].eligible]
    # Chosen before (a re-opened one too, while still eligible): they keep their place, unless
    # their analysis has finished and a late series is materially better (ranking.choose).
    kept = [facts[s.series_instance_uid] for s in study if s.was_chosen and (
        not s.pending or verdicts[s.series_instance_uid].eligible)]
    finished = [s.series_instance_uid for s in study if not s.pending and
                s.last_job_state in (JobState.DONE.value, JobState.FAILED.value)]
    decisions: dict[str, Decision] = {
        d.series_instance_uid: d for d in choose(eligible, settings.selection.kernels,
                                                 kept=kept, finished=finished)}
    superseded = {uid for uid, d in decisions.items() if d.superseded_by}
    analysed = list(dict.fromkeys([k.series_instance_uid for k in kept
                                   if k.series_instance_uid not in superseded] + [
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
    for uid in superseded:
        out[uid] = (SUPERSEDED, decisions[uid].reason)
    return out


#: decide_study's mark of a series analysed before whose answer a late series replaces.
SUPERSEDED = "superseded"


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
        except Exception:
            log.exception("series selection failed", extra={
                "study_uid": study[0].study_instance_uid})
            continue
        queued = set()
        for series in study:
            if series.series_instance_uid not in decided or \
                    decided[series.series_instance_uid][0] == SUPERSEDED:
                continue
            skip, reason = decided[series.series_instance_uid]
            job = index.schedule_series(series, skip_reason=skip, reason=reason)
            if job is None:
                continue
            if skip is None:
                queued.add(series.series_instance_uid)
            created.append(job)
            _record(index, settings, series, job, skip, reason)
        for series in study:
            decision = decided.get(series.series_instance_uid)
            if decision is None or decision[0] != SUPERSEDED:
                continue
            # Only once the better series' job exists: never leave the part without an answer.
            if superseding_series(decision[1]) not in queued:
                continue
            job = index.supersede_series(series.series_instance_uid, decision[1])
            if job is not None:
                created.append(job)
                log.info("series superseded", extra={
                    "job_id": job.id, "version": job.version,
                    "series_uid": series.series_instance_uid, "reason": decision[1]})
                audit.record(index, "series_superseded", "success",
                             actor=settings.node.ae_title,
                             study_instance_uid=series.study_instance_uid,
                             series_instance_uid=series.series_instance_uid, job_id=job.id,
                             reason=decision[1])
    return created


def _record(index: Index, settings: Settings, series: StableSeries, job, skip: str | None,
            reason: str) -> None:
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
        except Exception:
            log.exception("scheduler pass failed")

    def start(self) -> None:
        self._sched.start()

    def stop(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)
