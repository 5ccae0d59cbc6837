"""One study, one answer (issue 27): a study as a scanner routes it (scout, thin bone and soft
axials, a 5 mm axial, a sagittal MPR, a dose screen) gives exactly one analysed series, and
every other series a skipped job whose reason names the chosen series or the failed rule.

In-process like tests/dicom_node/test_worker_scheduler.py: the files go through the store and
the index as the SCP writes them, the real scheduler decides, the worker runs the fake
pipeline on the real series loader.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner

from config import load_settings
from dicom_node.cli import app
from dicom_node.context import NodeContext
from dicom_node.scheduler import schedule_stable_series
from dicom_node.worker import Worker
from storage.db import utcnow
from tests.dicom_node import fake_pipeline
from tests.helpers import write_config
from tests.helpers.indexing import ingest_folder, tick


@pytest.fixture(scope="module")
def phantom_slices(tmp_path_factory) -> list[pydicom.Dataset]:
    """A phantom spine CT (T12-L2, 1 mm slices, B70f), its slices in position order."""
    from pipeline.phantom import generate, write_study
    ph = generate(5, levels="T12-L2", fractures="none",
                  acquisition={"matrix": 64, "pixel_spacing": 1.5, "slice_spacing": 1.0,
                               "slice_thickness": 1.0, "kernel": "B70f"})
    out = tmp_path_factory.mktemp("phantom")
    write_study(ph, out)
    slices = [pydicom.dcmread(p) for p in sorted((out / "dicom").glob("*.dcm"))]
    return sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))


def _series(slices: list[pydicom.Dataset], out: Path, number: int, *, kernel: str | None = None,
            edit=None) -> str:
    """Write ``slices`` again as a new series of the same study (new UIDs, SeriesNumber)."""
    out.mkdir(parents=True)
    uid = generate_uid()
    for k, src in enumerate(slices):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = number
        ds.InstanceNumber = k + 1
        if kernel is not None:
            ds.ConvolutionKernel = kernel
        if edit is not None:
            edit(ds, k)
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
    return uid


def _sagittal_mpr(slices: list[pydicom.Dataset], out: Path) -> str:
    """A sagittal reformat (PS3.3 C.8.2.1.1.1 ImageType DERIVED\\SECONDARY\\REFORMATTED):
    rows along z, columns along y, one image per x position, pixels resampled from the
    axial stack."""
    volume = np.stack([s.pixel_array for s in slices])            # (z, y, x)
    spacing_yx = [float(v) for v in slices[0].PixelSpacing]
    z0 = float(slices[0].ImagePositionPatient[2])
    x0, y0 = (float(v) for v in slices[0].ImagePositionPatient[:2])
    columns = list(range(8, volume.shape[2] - 8, 2))              # 24 sagittal planes

    def edit(ds, k):
        x = columns[k]
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        top = z0 + (volume.shape[0] - 1) * float(ds.SliceThickness)
        ds.ImagePositionPatient = [f"{x0 + x * spacing_yx[1]:g}", f"{y0:g}", f"{top:g}"]
        plane = np.ascontiguousarray(volume[::-1, :, x])
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [f"{float(ds.SliceThickness):g}", f"{spacing_yx[0]:g}"]
        ds.SliceThickness = f"{spacing_yx[1] * 2:g}"
        ds.PixelData = plane.tobytes()
    return _series([slices[0]] * len(columns), out, 601, edit=edit)


def _scout(slices: list[pydicom.Dataset], out: Path) -> str:
    """Two localizer images (ImageType ORIGINAL\\PRIMARY\\LOCALIZER), AP and lateral."""
    orientations = [["1", "0", "0", "0", "0", "-1"], ["0", "1", "0", "0", "0", "-1"]]

    def edit(ds, k):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = orientations[k]
    return _series(slices[:2], out, 1, edit=edit)


def _dose_screen(slices: list[pydicom.Dataset], out: Path) -> str:
    """A dose report screen capture as scanners send it: Secondary Capture, Modality CT."""
    def edit(ds, k):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
                        "ConvolutionKernel"):
            delattr(ds, keyword)
    return _series(slices[:1], out, 501, edit=edit)


@pytest.fixture
def ctx(tmp_path):
    # The node stores Secondary Capture (the dose screen) only because it is configured to.
    settings = load_settings(None, storage={"root": tmp_path / "store", "min_free_mb": 0,
                                            "fsync": False},
                             node={"extra_storage_sop_classes": [SecondaryCaptureImageStorage]},
                             scheduler={"stable_seconds": 0})
    c = NodeContext.open(settings)
    yield c
    c.close()


def _routed_study(s: list[pydicom.Dataset], out: Path) -> dict[str, str]:
    """The series of one study as a scanner routes it: name -> Series Instance UID."""
    return {
        "scout": _scout(s, out / "scout"),
        "soft": _series(s, out / "soft", 3, kernel="B30f"),
        "bone": _series(s, out / "bone", 4, kernel="B70f"),
        "thick": _series(s[::5], out / "thick", 5, kernel="B30f",
                         edit=lambda ds, k: setattr(ds, "SliceThickness", "5")),
        "sagittal": _sagittal_mpr(s, out / "sagittal"),
        "dose": _dose_screen(s, out / "dose"),
    }


#: The rule each ineligible series of :func:`_routed_study` fails.
EXPECTED_RULE = {
    "scout": "ImageType ORIGINAL\\PRIMARY\\LOCALIZER contains 'LOCALIZER'",
    "thick": "slice_thickness_mm 5 is above 3 (selection.max_slice_mm)",
    "sagittal": "ImageType DERIVED\\SECONDARY\\REFORMATTED does not contain 'ORIGINAL'",
    "dose": "1 slices, fewer than selection.min_slices = 20",
}


def test_routed_study_gives_one_job_for_the_thin_bone_axial(ctx, phantom_slices, tmp_path):
    uids = _routed_study(phantom_slices, tmp_path)
    for name in uids:
        ingest_folder(ctx, tmp_path / name)
    # A study is decided once, when all of it is stable: nothing while a series still arrives.
    early = utcnow() - dt.timedelta(seconds=30)
    assert schedule_stable_series(ctx.index, ctx.settings, now=early, store=ctx.store) == []

    jobs = {j.series_instance_uid: j for j in tick(ctx)}
    assert set(jobs) == set(uids.values())
    by_name = {name: jobs[uid] for name, uid in uids.items()}
    assert [n for n, j in by_name.items() if j.state == "queued"] == ["bone"]
    bone = uids["bone"]
    assert by_name["bone"].error is None
    assert by_name["bone"].reason.startswith("chosen: B70f bone kernel, 1 mm slices")
    assert by_name["soft"].error.startswith(f"not chosen: series {bone} (B70f bone kernel")
    for name, rule in EXPECTED_RULE.items():
        job = by_name[name]
        assert job.state == "skipped", (name, job.error)
        assert rule in job.error, (name, job.error)
        assert job.error.endswith(f"; series {bone} is analysed"), (name, job.error)
    assert "axial_tilt_deg 90 is above 10" in by_name["sagittal"].error
    assert tick(ctx) == []                      # decided once

    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
                    analyse=fake_pipeline.analyse, publish=lambda **kw: None)
    assert worker.run_once() and not worker.run_once()   # exactly one job runs
    done = [j for j in ctx.index.jobs() if j.state == "done"]
    assert [j.series_instance_uid for j in done] == [bone]
    [summary] = [r for r in ctx.index.results(done[0].id) if r.kind == "summary"]
    assert json.loads(ctx.store.read_bytes(summary.path))["series_instance_uid"] == bone


def test_too_short_series_is_skipped_with_its_reason(ctx, phantom_slices, tmp_path):
    """30 slices of 1 mm (a head or a partial scan): not two vertebrae, nothing analysed."""
    uid = _series(phantom_slices[:30], tmp_path / "short", 2)
    ingest_folder(ctx, tmp_path / "short")
    [job] = tick(ctx)
    assert (job.series_instance_uid, job.state) == (uid, "skipped")
    assert job.error == "z_coverage_mm 29 is below 50 (selection.min_coverage_mm)"


def test_cli_shows_choice_and_rerun_series_overrides_it(ctx, phantom_slices, tmp_path,
                                                        monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("SPINE_NODE_"):
            monkeypatch.delenv(key)
    soft = _series(phantom_slices, tmp_path / "soft", 3, kernel="B30f")
    bone = _series(phantom_slices, tmp_path / "bone", 4, kernel="B70f")
    ingest_folder(ctx, tmp_path / "soft")
    ingest_folder(ctx, tmp_path / "bone")
    tick(ctx)
    config = write_config(tmp_path / "n.toml", {
        "storage": {"root": str(ctx.settings.storage.root), "min_free_mb": 0, "fsync": False}})
    runner = CliRunner()
    [study] = json.loads(runner.invoke(app, ["studies", "--json", "-c", str(config)]).output)
    series = {s["series_instance_uid"]: s for s in study["series"]}
    assert series[bone]["chosen"] and series[bone]["reason"].startswith("chosen: B70f bone")
    assert not series[soft]["chosen"]
    assert series[soft]["reason"].startswith(f"not chosen: series {bone}")
    text = runner.invoke(app, ["jobs", "-c", str(config)]).output
    assert f"not chosen: series {bone}" in text

    # Plain rerun: the chosen series only (it is queued still: nothing to do, and it says so).
    res = runner.invoke(app, ["rerun", study["study_instance_uid"], "-c", str(config)])
    assert res.exit_code == 0 and "already queued" in res.output, res.output
    res = runner.invoke(app, ["rerun", study["study_instance_uid"], "--series", soft,
                              "-c", str(config)])
    assert res.exit_code == 0, res.output
    [study] = json.loads(runner.invoke(app, ["studies", "--json", "-c", str(config)]).output)
    series = {s["series_instance_uid"]: s for s in study["series"]}
    assert series[soft]["chosen"] and "rerun --series" in series[soft]["reason"]
    [event] = [e for e in ctx.index.audit_events() if e.event_type == "rerun"
               and e.outcome == "success"]
    assert event.details["series_instance_uid"] == soft and event.details["override"]


@pytest.mark.integration
def test_routed_study_sent_to_a_running_node_is_analysed_once(node_factory, phantom_slices,
                                                              tmp_path):
    """The same over the network: C-STORE to ``spine-node serve`` (default selection, fake
    pipeline); ``jobs --json`` and ``studies --json`` show the one answer and the reasons."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage
    node = node_factory(pipeline={"entry_point": "tests.dicom_node.fake_pipeline:analyse"},
                        selection={"min_coverage_mm": 50},
                        node={"extra_storage_sop_classes": [SecondaryCaptureImageStorage]}
                        ).start()
    uids = _routed_study(phantom_slices, tmp_path)
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        for name in uids:
            for p in sorted((tmp_path / name).glob("*.dcm")):
                assert assoc.send_c_store(p).Status == 0x0000, (name, p)
    finally:
        assoc.release()

    def settled():
        jobs = node.cli_json("jobs")
        return jobs if len(jobs) == len(uids) and all(
            j["state"] in ("done", "skipped", "failed") for j in jobs) else None

    jobs = {j["series_instance_uid"]: j for j in node.wait_for(settled, timeout=120,
                                                               what="six jobs settled")}
    bone = uids["bone"]
    assert [uid for uid, j in jobs.items() if j["state"] != "skipped"] == [bone]
    assert jobs[bone]["state"] == "done", jobs[bone]
    assert jobs[uids["soft"]]["error"].startswith(f"not chosen: series {bone} ")
    for name, rule in EXPECTED_RULE.items():
        assert rule in jobs[uids[name]]["error"], (name, jobs[uids[name]])
    [study] = node.cli_json("studies")
    chosen = {s["series_instance_uid"]: s["chosen"] for s in study["series"]}
    assert chosen == {uid: uid == bone for uid in uids.values()}


def test_late_series_does_not_make_a_second_answer(ctx, phantom_slices, tmp_path):
    """A better series arriving while the chosen one's analysis is under way is skipped (the
    chosen one stays: one answer; tests/dicom_node/test_late_arrivals.py: once that analysis
    has finished, the better one supersedes it); a late instance of the chosen series makes a
    new version of it."""
    soft = _series(phantom_slices, tmp_path / "soft", 3, kernel="B30f")
    ingest_folder(ctx, tmp_path / "soft")
    [first] = tick(ctx)
    assert (first.series_instance_uid, first.state) == (soft, "queued")
    bone = _series(phantom_slices, tmp_path / "bone", 4, kernel="B70f")
    ingest_folder(ctx, tmp_path / "bone")
    [late] = tick(ctx)
    assert (late.series_instance_uid, late.state) == (bone, "skipped")
    assert late.error.startswith(f"not chosen: series {soft} (B30f soft kernel")
    assert late.error.endswith("is analysed (chosen before this series arrived; its "
                               "analysis is under way)")
    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
                    analyse=fake_pipeline.analyse, publish=lambda **kw: None)
    assert worker.run_once() and not worker.run_once()
    # One more slice of the chosen series (a copy at a new position): version 2 of it.
    extra = tmp_path / "extra"
    extra.mkdir()
    ds = pydicom.dcmread(sorted((tmp_path / "soft").glob("*.dcm"))[-1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = len(phantom_slices) + 1
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(extra / "late.dcm", enforce_file_format=True)
    ingest_folder(ctx, extra)
    [again] = tick(ctx)
    assert (again.series_instance_uid, again.version, again.state) == (soft, 2, "queued")
    assert again.reason.endswith("(chosen before; new instances arrived)")
    assert worker.run_once()
    assert [j.state for j in ctx.index.jobs() if j.series_instance_uid == soft] == \
        ["done", "done"]
