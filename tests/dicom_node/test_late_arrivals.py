"""Late arrivals (issue 27, DESIGN.md "Data flow"): a better series that arrives after the study
was analysed gives a new answer that supersedes the old one, and says so: summary.json, the SR
(a TEXT statement, and the old SR in the Predecessor Documents Sequence; the SR still passes
dciodvfy); the old series is marked superseded (``studies`` shows one chosen series). A worse
one is skipped naming the series analysed; a late instance of the chosen series makes a new
version of it that replaces the previous version.

In-process (store, index, the real scheduler with the default selection, worker and publish);
the phantom's ground truth stands in for the models.
"""
from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.worker import Worker
from pipeline.outputs.sr import read_context_statements
from tests.dicom_node.test_study_parts import (  # noqa: F401
    ctx,
    ground_truth,
    phantom,
    result_files,
    write_part,
)
from tests.helpers.indexing import ingest_folder, tick
from tests.helpers.synthetic_results import dciodvfy_errors


def _with_kernel(folder: Path, kernel: str, thickness: str | None = None) -> None:
    for p in folder.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.ConvolutionKernel = kernel
        if thickness:
            ds.SliceThickness = thickness
        ds.save_as(p, enforce_file_format=True)


@pytest.mark.slow
def test_better_late_series_supersedes_the_answer_and_says_which_it_replaces(
        ctx, phantom, tmp_path):  # noqa: F811
    folder, slices = phantom
    soft = write_part(slices, tmp_path / "soft", 3)
    _with_kernel(tmp_path / "soft", "B30f")
    ingest_folder(ctx, tmp_path / "soft")
    [first] = tick(ctx)
    assert (first.series_instance_uid, first.state) == (soft, "queued")
    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store, analyse=ground_truth(folder))
    assert worker.run_once()
    _, old = result_files(ctx, first.id)

    # The bone-kernel reconstruction arrives after the soft one was analysed.
    bone = write_part(slices, tmp_path / "bone", 4)
    ingest_folder(ctx, tmp_path / "bone")
    jobs = {j.series_instance_uid: j for j in tick(ctx)}
    assert (jobs[bone].state, jobs[bone].version) == ("queued", 1)
    assert jobs[bone].reason == (
        f"chosen: B70f bone kernel, 1 mm slices, 209 mm z coverage; arrived after series "
        f"{soft} (B30f soft kernel, 1 mm slices, 209 mm z coverage) was analysed and "
        "supersedes it")
    assert (jobs[soft].state, jobs[soft].version) == ("skipped", 2)
    assert jobs[soft].error.startswith(f"superseded: series {bone} (B70f bone kernel")
    [study] = ctx.index.studies()
    assert {s["series_instance_uid"]: s["chosen"] for s in study["series"]} == \
        {soft: False, bone: True}

    assert worker.run_once() and not worker.run_once()
    summary, new = result_files(ctx, jobs[bone].id)
    old_sr = str(old["sr"].SOPInstanceUID)
    assert summary["study"] == {
        "multi_part": False,
        "replaces": [{"series_instance_uid": soft, "version": 1, "sr_sop_instance_uid": old_sr}],
        "replaces_statement": f"Replaces the result of series {soft} version 1 (SR {old_sr})."}
    assert read_context_statements(new["sr"]) == {"replaces": summary["study"][
        "replaces_statement"]}
    [predecessor] = new["sr"].PredecessorDocumentsSequence
    [ref_series] = predecessor.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == old["sr"].SeriesInstanceUID
    assert ref_series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr
    errors, output = dciodvfy_errors(new["sr"], tmp_path / "sr.dcm")
    assert errors == [], output

    # Worse series arriving later still: skipped, naming the series analysed; no new answer.
    thick = write_part(slices[::2], tmp_path / "thick", 5)
    _with_kernel(tmp_path / "thick", "B70f", thickness="2")
    ingest_folder(ctx, tmp_path / "thick")
    [late] = tick(ctx)
    assert (late.series_instance_uid, late.state) == (thick, "skipped")
    assert late.error == (f"not chosen: series {bone} (B70f bone kernel, 1 mm slices, 209 mm "
                          "z coverage) is analysed (chosen before this series arrived)")
    assert not worker.run_once()


@pytest.mark.slow
def test_late_instance_of_the_chosen_series_replaces_its_previous_version(
        ctx, phantom, tmp_path):  # noqa: F811
    folder, slices = phantom
    bone = write_part(slices[:-1], tmp_path / "bone", 4)
    ingest_folder(ctx, tmp_path / "bone")
    [first] = tick(ctx)
    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store, analyse=ground_truth(folder))
    assert worker.run_once()
    _, old = result_files(ctx, first.id)
    # The last slice comes late (same series).
    extra = tmp_path / "extra"
    extra.mkdir()
    ds = pydicom.dcmread(next((tmp_path / "bone").glob("*.dcm")))
    last = slices[-1]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = len(slices)
    ds.ImagePositionPatient = last.ImagePositionPatient
    ds.PixelData = last.PixelData
    ds.save_as(extra / "late.dcm", enforce_file_format=True)
    ingest_folder(ctx, extra)
    [again] = tick(ctx)
    assert (again.series_instance_uid, again.version, again.state) == (bone, 2, "queued")
    assert worker.run_once()
    summary, new = result_files(ctx, again.id)
    old_sr = str(old["sr"].SOPInstanceUID)
    assert summary["study"]["replaces"] == [
        {"series_instance_uid": bone, "version": 1, "sr_sop_instance_uid": old_sr}]
    assert read_context_statements(new["sr"])["replaces"] == \
        f"Replaces the result of series {bone} version 1 (SR {old_sr})."
    assert new["sr"].SOPInstanceUID != old_sr
    assert json.loads(json.dumps(summary))["series_instance_uid"] == bone

