"""One answer per part of the spine (issue 27): a study whose eligible series cover different
parts without overlap (a thoracic and a lumbar acquisition of one patient) has each part
analysed once, and each result, summary.json and the SR, says that it covers part of a
multi-part study and names the other part.

In-process like tests/dicom_node/test_series_choice.py (store, index, the real scheduler with
the default selection, the real worker and publish, SR built with highdicom); the phantom's
ground truth stands in for the models (tests/deploy/groundtruth_pipeline.py).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from config import load_settings
from dicom_node.context import NodeContext
from dicom_node.worker import Worker
from pipeline.outputs.sr import read_context_statements
from tests.deploy.groundtruth_pipeline import from_ground_truth
from tests.helpers.indexing import ingest_folder, tick
from tests.helpers.synthetic_results import dciodvfy_errors

#: Where the phantom (T9-L3, 1 mm slices) is cut between T12 and L1, and the gap between the
#: two acquisitions (mm): no z overlap.
CUT_Z, GAP = -592.0, 4.0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, list[pydicom.Dataset]]:
    from pipeline.phantom import generate, write_study
    ph = generate(5, levels="T9-L3", fractures="L1:2:wedge",
                  acquisition={"matrix": 160, "pixel_spacing": 2.0, "slice_spacing": 1.0,
                               "slice_thickness": 1.0, "kernel": "B70f",
                               "circle_padding": False})
    out = tmp_path_factory.mktemp("phantom")
    write_study(ph, out)
    slices = sorted((pydicom.dcmread(p) for p in (out / "dicom").glob("*.dcm")),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    return out, slices


def write_part(slices: list[pydicom.Dataset], out: Path, number: int) -> str:
    """``slices`` as a series of their own (a separate acquisition of the same study and frame
    of reference)."""
    out.mkdir(parents=True)
    uid = generate_uid()
    for k, src in enumerate(slices):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber, ds.InstanceNumber = number, k + 1
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
    return uid


def ground_truth(folder: Path):
    """``analyse`` answering with the phantom's truth on whatever part it is given: the
    vertebrae whose centre lies in the series."""
    gt = json.loads((folder / "gt.json").read_text())
    labels = sitk.ReadImage(str(folder / "labels.nii.gz"))

    def analyse(series, device: str = "auto"):
        zs = [float(h.ImagePositionPatient[2]) for h in series.headers]
        part = dict(gt, vertebrae=[v for v in gt["vertebrae"]
                                   if min(zs) <= v["centroid_mm"][2] <= max(zs)])
        return from_ground_truth(series, part, labels)
    return analyse


@pytest.fixture
def ctx(tmp_path):
    settings = load_settings(None, storage={"root": tmp_path / "store", "min_free_mb": 0,
                                            "fsync": False},
                             scheduler={"stable_seconds": 0})  # default selection
    c = NodeContext.open(settings)
    yield c
    c.close()


def result_files(ctx, job_id: int) -> tuple[dict, dict[str, pydicom.Dataset]]:
    rows = {r.kind: ctx.store.path(r.path) for r in ctx.index.results(job_id)}
    summary = json.loads(Path(rows.pop("summary")).read_text())
    return summary, {kind: pydicom.dcmread(path) for kind, path in rows.items()}


@pytest.mark.slow
def test_thoracic_and_lumbar_series_are_each_analysed_once_as_parts_of_one_study(
        ctx, phantom, tmp_path):
    folder, slices = phantom
    z = [float(s.ImagePositionPatient[2]) for s in slices]
    thoracic = write_part([s for s, v in zip(slices, z) if v > CUT_Z + GAP / 2],
                          tmp_path / "thoracic", 3)
    lumbar = write_part([s for s, v in zip(slices, z) if v < CUT_Z - GAP / 2],
                        tmp_path / "lumbar", 4)
    ingest_folder(ctx, tmp_path / "thoracic")
    ingest_folder(ctx, tmp_path / "lumbar")
    jobs = {j.series_instance_uid: j for j in tick(ctx)}
    assert {uid: j.state for uid, j in jobs.items()} == {thoracic: "queued", lumbar: "queued"}
    assert any("a part of the spine no other chosen series covers" in j.reason
               for j in jobs.values()), [j.reason for j in jobs.values()]
    assert tick(ctx) == []

    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
                    analyse=ground_truth(folder))
    assert worker.run_once() and worker.run_once() and not worker.run_once()
    done = {j.series_instance_uid: j for j in ctx.index.jobs() if j.state == "done"}
    assert set(done) == {thoracic, lumbar}                  # each part once
    names = {}
    for uid, other in ((thoracic, lumbar), (lumbar, thoracic)):
        summary, objects = result_files(ctx, done[uid].id)
        study = summary["study"]
        assert study["multi_part"] is True and "replaces" not in study, study
        assert study["part"]["series_instance_uid"] == uid
        assert study["part"]["other_parts"] == [other]
        low, high = study["part"]["z_range_mm"]
        assert (high < CUT_Z) == (uid == lumbar) and (low > CUT_Z) == (uid == thoracic)
        statement = study["part"]["statement"]
        assert statement.startswith(f"Covers part of a multi-part study: series {uid} (z ")
        assert statement.endswith(f"the study's other part (series {other}) is reported "
                                  "separately.")
        # The SR says the same, read back from its content tree, and is still valid.
        assert read_context_statements(objects["sr"]) == {"part": statement}
        errors, output = dciodvfy_errors(objects["sr"], tmp_path / f"sr-{uid}.dcm")
        assert errors == [], output
        referenced = {item.SeriesInstanceUID
                      for item in objects["seg"].ReferencedSeriesSequence}
        assert referenced == {uid}
        names[uid] = {v["name"] for v in summary["vertebrae"]}
    assert "T11" in names[thoracic] and "L2" in names[lumbar]
    assert not names[thoracic] & names[lumbar]


@pytest.mark.slow
def test_a_single_series_says_nothing_of_parts(ctx, phantom, tmp_path):
    folder, slices = phantom
    uid = write_part(slices, tmp_path / "whole", 3)
    ingest_folder(ctx, tmp_path / "whole")
    [job] = tick(ctx)
    assert job.state == "queued"
    worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
                    analyse=ground_truth(folder))
    assert worker.run_once()
    summary, objects = result_files(ctx, job.id)
    assert summary["series_instance_uid"] == uid and "study" not in summary
    assert read_context_statements(objects["sr"]) == {}
    assert "PredecessorDocumentsSequence" not in objects["sr"]
    errors, output = dciodvfy_errors(objects["sr"], tmp_path / "sr.dcm")
    assert errors == [], output
