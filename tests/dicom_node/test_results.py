"""Publishing a job's results (dicom_node/results.py): stored atomically per version, recorded
with their deliveries, reruns in new series that leave the old ones alone; and the worker's
call into it."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from config import load_settings
from dicom_node.results import publish
from dicom_node.worker import Worker
from storage.db import Database, utcnow
from storage.deliveries import DeliveryQueue
from storage.files import BlobStore
from storage.index import Index, InstanceRecord
from storage.models import JobState, Result
from storage.queue import JobQueue
from tests.helpers import REPO, write_config
from tests.helpers import synthetic_results as synth


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    paths, _study, _series = synth.write_series(tmp_path_factory.mktemp("ct"))
    return paths


@pytest.fixture
def config_path(tmp_path) -> Path:
    return write_config(tmp_path / "spine-node.toml", {
        "storage": {"root": str(tmp_path / "store"), "min_free_mb": 0, "fsync": False},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "viewer", "ae_title": "VIEW", "host": "127.0.0.1", "port": 105,
             "objects": ["key_image"]}]})


@pytest.fixture
def node(config_path):
    settings = load_settings(config_path)
    db = Database(settings.storage.database_url)
    db.upgrade()
    store = BlobStore(settings.storage.root, fsync=False)
    yield settings, db, Index(db), JobQueue(db), store
    db.dispose()


def _receive(index: Index, store: BlobStore, paths: list[Path]) -> None:
    """What the SCP does for each instance: store the file, index it."""
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        rel = store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        store.write_atomic(rel, p.read_bytes())
        index.add_instance(InstanceRecord(
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, modality="CT", path=rel,
            size_bytes=p.stat().st_size))


def _schedule(index: Index) -> None:
    """What the scheduler does once the series is stable."""
    for series in index.stable_series(utcnow() + dt.timedelta(seconds=1)):
        index.schedule_series(series, skip_reason=None)


def _job(index: Index, queue: JobQueue):
    _schedule(index)
    return queue.claim("test")


def test_worker_publishes_seg_sr_and_key_image_with_their_deliveries(node, ct):
    settings, db, index, queue, store = node
    _receive(index, store, ct)
    _schedule(index)
    worker = Worker(settings, index, queue, store, analyse=lambda series, device: synth.analysis(series))
    assert worker.run_once()
    (job,) = index.jobs()
    assert job.state == "done", job.error
    with db.session() as s:
        results = {r.kind: r for r in s.query(Result).filter_by(job_id=job.id)}
    assert set(results) == {"seg", "sr", "key_image", "summary"}
    for kind in ("seg", "sr", "key_image"):
        r = results[kind]
        assert r.path.endswith(f"/v1-job{job.id}/{kind}.dcm")
        ds = pydicom.dcmread(store.path(r.path), stop_before_pixels=True)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (r.sop_instance_uid,
                                                             r.series_instance_uid)
        assert ds.SeriesDescription.startswith("spine-node v1 ")
    rows = DeliveryQueue(db).for_study(job.study_instance_uid)
    assert sorted((r["destination"], r["kind"]) for r in rows) == [
        ("pacs", "key_image"), ("pacs", "seg"), ("pacs", "sr"), ("viewer", "key_image")]


def test_rerun_is_a_new_version_in_new_series_and_leaves_the_old_files_alone(node, ct):
    settings, db, index, queue, store = node
    _receive(index, store, ct)
    series = synth.load(ct)
    result = synth.analysis(series)
    v1 = publish(job=_job(index, queue), series=series, result=result, index=index,
                 store=store, settings=settings)
    before = {o.path: store.path(o.path).read_bytes() for o in v1.objects}
    (rerun,) = index.rerun_study(series.study_instance_uid)
    v2 = publish(job=queue.claim("test"), series=series, result=result, index=index,
                 store=store, settings=settings)
    assert rerun.version == v2.version == 2
    assert {o.path: store.path(o.path).read_bytes() for o in v1.objects} == before
    for a, b in zip(v1.objects, v2.objects):
        assert a.kind == b.kind
        assert b.series_instance_uid != a.series_instance_uid
        assert b.sop_instance_uid != a.sop_instance_uid
        assert "/v2-job" in b.path
        ds = pydicom.dcmread(store.path(b.path), stop_before_pixels=True)
        assert ds.SeriesDescription.startswith("spine-node v2 ")
    assert len(DeliveryQueue(db).for_study(series.study_instance_uid)) == 8


def test_publishing_a_job_twice_records_it_once(node, ct):
    settings, db, index, queue, store = node
    _receive(index, store, ct)
    series = synth.load(ct)
    job = _job(index, queue)
    a = publish(job=job, series=series, result=synth.analysis(series), index=index,
                store=store, settings=settings)
    b = publish(job=job, series=series, result=synth.analysis(series), index=index,
                store=store, settings=settings)
    assert [o.result_id for o in a.objects] == [o.result_id for o in b.objects]
    assert [o.sop_instance_uid for o in a.objects] == [o.sop_instance_uid for o in b.objects]
    assert len(DeliveryQueue(db).for_study(series.study_instance_uid)) == 4


def test_resend_command_requeues_the_latest_results_for_every_destination(node, ct,
                                                                          config_path):
    settings, db, index, queue, store = node
    _receive(index, store, ct)
    series = synth.load(ct)
    job = _job(index, queue)
    publish(job=job, series=series, result=synth.analysis(series), index=index, store=store,
            settings=settings)
    queue.finish(job.id, JobState.DONE)
    deliveries = DeliveryQueue(db)
    for destination in ("pacs", "viewer"):
        for c in deliveries.claim_due(destination):
            deliveries.mark_delivered(c.id)
    assert {r["state"] for r in deliveries.for_study(series.study_instance_uid)} == {"delivered"}
    res = subprocess.run([sys.executable, "-m", "dicom_node", "resend", series.study_instance_uid,
                          "--config", str(config_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 deliveries queued" in res.stdout
    rows = deliveries.for_study(series.study_instance_uid)
    assert {(r["state"], r["attempts"]) for r in rows} == {("pending", 0)}
