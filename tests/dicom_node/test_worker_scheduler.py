"""Scheduler selection rules and the worker's job handling, in-process (no network)."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from config import load_settings
from dicom_node.context import NodeContext
from dicom_node.scheduler import schedule_stable_series
from dicom_node.worker import Worker
from storage.db import utcnow
from storage.index import InstanceRecord
from storage.models import JobState
from tests.dicom_node import fake_pipeline
from tests.helpers import write_ct_series


@pytest.fixture
def ctx(tmp_path):
    settings = load_settings(None, storage={"root": tmp_path / "store", "min_free_mb": 0,
                                            "fsync": False},
                             scheduler={"stable_seconds": 0},
                             # 20 slices of 1 mm (19 mm), a disc, not a spine
                             selection={"min_coverage_mm": 0, "spine_check": False})
    c = NodeContext.open(settings)
    yield c
    c.close()


def _ingest(ctx, written, modality="CT"):
    """Store and index files as the SCP would."""
    import pydicom
    for p in written.paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        rel = ctx.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID)
        ctx.store.write_atomic(rel, p.read_bytes())
        ctx.index.add_instance(InstanceRecord(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
            ds.file_meta.TransferSyntaxUID, modality, rel, p.stat().st_size,
            int(ds.InstanceNumber)))


def _tick(ctx):
    return schedule_stable_series(ctx.index, ctx.settings, now=utcnow() + dt.timedelta(seconds=1))


def test_selection_rules_queue_or_skip_with_reason(ctx, tmp_path):
    _ingest(ctx, write_ct_series(tmp_path / "ct", n_slices=20, rows=8, columns=8))
    _ingest(ctx, write_ct_series(tmp_path / "mr", n_slices=25, rows=8, columns=8,
                                 modality="MR"), modality="MR")
    _ingest(ctx, write_ct_series(tmp_path / "few", n_slices=19, rows=8, columns=8))
    jobs = {j.instances: j for j in _tick(ctx)}
    assert jobs[20].state == "queued" and jobs[20].error is None
    assert jobs[25].state == "skipped"
    assert jobs[25].error == "modality MR is not selected (selection.modalities = ['CT'])"
    assert jobs[19].state == "skipped"
    assert jobs[19].error == "19 slices, fewer than selection.min_slices = 20"
    assert _tick(ctx) == []  # nothing new: no new jobs


def test_worker_runs_pipeline_and_writes_summary(ctx, tmp_path):
    w = write_ct_series(tmp_path / "ct", n_slices=20, rows=16, columns=16)
    _ingest(ctx, w)
    _tick(ctx)
    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
                    analyse=fake_pipeline.analyse, publish=lambda **kw: None)
    assert worker.run_once()
    [job] = ctx.index.jobs()
    assert (job.state, job.error, job.attempts) == ("done", None, 1)
    [result] = ctx.index.results(job.id)
    assert result.kind == "summary"
    summary = json.loads(ctx.store.read_bytes(result.path))
    assert summary["series_instance_uid"] == w.series_instance_uid
    assert ctx.index.studies()[0]["series"][0]["state"] == "done"
    assert not worker.run_once()  # queue empty


def test_worker_failures_are_readable_and_do_not_stop_it(ctx, tmp_path):
    _ingest(ctx, write_ct_series(tmp_path / "dup", n_slices=20, rows=8, columns=8,
                                 z_positions=[0.0] * 20))
    _ingest(ctx, write_ct_series(tmp_path / "ok", n_slices=20, rows=8, columns=8))
    _tick(ctx)

    def exploding(series, device="auto"):
        raise RuntimeError("CUDA out of memory")

    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store, analyse=exploding)
    assert worker.run_once() and worker.run_once()
    errors = sorted(j.error for j in ctx.index.jobs())
    assert errors[0].startswith("analysis failed: RuntimeError: CUDA out of memory")
    assert errors[1] == ("cannot load the series: 20 slices share position z=0.0 mm: "
                         "duplicate or overlapping acquisitions in one series")
    assert {j.state for j in ctx.index.jobs()} == {JobState.FAILED.value}


def test_missing_pipeline_module_fails_the_job(ctx, tmp_path):
    ctx.settings.pipeline.entry_point = "pipeline.not_here:analyse"
    _ingest(ctx, write_ct_series(tmp_path / "ct", n_slices=20, rows=8, columns=8))
    _tick(ctx)
    Worker(ctx.settings, ctx.index, ctx.queue, ctx.store).run_once()
    [job] = ctx.index.jobs()
    assert job.state == "failed"
    assert job.error == ("the analysis pipeline (pipeline.not_here) cannot be imported: "
                         "No module named 'pipeline.not_here'")


def test_a_series_over_the_memory_budget_fails_before_it_is_loaded(ctx, tmp_path):
    """pipeline.memory_budget_mb: the job fails with the estimate and the setting in its reason,
    the analysis is never called; just above the estimate the same series is analysed."""
    from pipeline.memory import SeriesSize, estimate_peak_mb

    written = write_ct_series(tmp_path / "ct", n_slices=20, rows=64, columns=64)
    _ingest(ctx, written)
    _tick(ctx)
    need = estimate_peak_mb(SeriesSize(64, 64, 20, (64.0, 64.0, 20.0)))
    called = []
    ctx.settings.pipeline.memory_budget_mb = need * 0.9
    Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
           analyse=lambda *a, **k: called.append(1)).run_once()
    [job] = ctx.index.jobs()
    assert job.state == "failed" and not called
    assert "pipeline.memory_budget_mb" in job.error and "20 slices of 64x64" in job.error

    written2 = write_ct_series(tmp_path / "ct2", n_slices=20, rows=64, columns=64)
    _ingest(ctx, written2)
    _tick(ctx)
    ctx.settings.pipeline.memory_budget_mb = need * 1.1
    Worker(ctx.settings, ctx.index, ctx.queue, ctx.store).run_once()
    states = {j.series_instance_uid: j.state for j in ctx.index.jobs()}
    assert states[written2.series_instance_uid] == "done", ctx.index.jobs()
