"""Gantry tilt (issue 27, "Geometry for every position"): a series whose slice positions do not
lie along the slice normal (the stack is sheared, as a tilted gantry acquires it) is refused
with a reason that says so: by the selection before a job is queued (another series of the
study is analysed instead), and by the loader for ``spine-node process``. A regular stack of
the same study is analysed.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from config import load_settings
from dicom_node.context import NodeContext
from pipeline.series_loader import SeriesLoadError, load_series
from tests.helpers.indexing import ingest_folder, tick

TILT_DEG = 15.0


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[pydicom.Dataset]:
    from pipeline.phantom import generate, write_study
    ph = generate(5, levels="T12-L2", fractures="none",
                  acquisition={"matrix": 96, "pixel_spacing": 2.0, "slice_spacing": 1.0,
                               "slice_thickness": 1.0, "kernel": "B70f",
                               "circle_padding": False})
    out = tmp_path_factory.mktemp("phantom")
    write_study(ph, out)
    return sorted((pydicom.dcmread(p) for p in (out / "dicom").glob("*.dcm")),
                  key=lambda d: float(d.ImagePositionPatient[2]))


def write(slices: list[pydicom.Dataset], out: Path, number: int, kernel: str,
          tilt_deg: float = 0.0) -> str:
    """The slices as a new series; ``tilt_deg``: each slice's position moves along y by
    z x tan(tilt) (the stack a gantry tilted about the x axis acquires), GantryDetectorTilt set."""
    out.mkdir(parents=True)
    uid = generate_uid()
    z0 = float(slices[0].ImagePositionPatient[2])
    for k, src in enumerate(slices):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber, ds.InstanceNumber, ds.ConvolutionKernel = number, k + 1, kernel
        if tilt_deg:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            shift = (z - z0) * math.tan(math.radians(tilt_deg))
            ds.ImagePositionPatient = [f"{x:.3f}", f"{y + shift:.3f}", f"{z:.3f}"]
            ds.GantryDetectorTilt = f"{tilt_deg:g}"
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
    return uid


@pytest.fixture
def ctx(tmp_path):
    settings = load_settings(None, storage={"root": tmp_path / "store", "min_free_mb": 0,
                                            "fsync": False},
                             scheduler={"stable_seconds": 0})  # default selection
    c = NodeContext.open(settings)
    yield c
    c.close()


def test_tilted_series_is_refused_with_its_reason_and_the_upright_one_analysed(
        ctx, slices, tmp_path):
    tilted = write(slices, tmp_path / "tilted", 2, "B70f", tilt_deg=TILT_DEG)
    upright = write(slices, tmp_path / "upright", 3, "B30f")
    ingest_folder(ctx, tmp_path / "tilted")
    ingest_folder(ctx, tmp_path / "upright")
    jobs = {j.series_instance_uid: j for j in tick(ctx)}
    # The bone-kernel series would rank first; its shear rules it out.
    assert (jobs[upright].state, jobs[tilted].state) == ("queued", "skipped")
    coverage = float(slices[-1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2])
    drift = coverage * math.tan(math.radians(TILT_DEG))
    assert jobs[tilted].error == (
        f"gantry tilt: slice positions drift {drift:.1f} mm within the image plane from the "
        f"first to the last slice (not along the slice normal, GantryDetectorTilt 15 deg); a "
        f"tilted stack is not resampled, it is refused; series {upright} is analysed")


def test_loader_refuses_the_tilted_stack_naming_the_tilt(slices, tmp_path):
    write(slices, tmp_path / "tilted", 2, "B70f", tilt_deg=TILT_DEG)
    with pytest.raises(SeriesLoadError, match=r"slice positions drift [\d.]+ mm within the "
                                              r"image plane \(gantry tilt"):
        load_series(sorted((tmp_path / "tilted").glob("*.dcm")))


def test_positions_rounded_by_the_scanner_are_not_a_tilt(ctx, slices, tmp_path):
    """Positions written with 0.01 mm jitter in x and y (DS rounding): still one upright
    stack, analysed."""
    def jitter(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x + 0.01 * (k % 2):.3f}", f"{y - 0.01 * (k % 3 == 0):.3f}",
                                   f"{z:.3f}"]
    out = tmp_path / "jitter"
    uid = write(slices, out, 2, "B70f")
    for p in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(p)
        jitter(ds, int(ds.InstanceNumber))
        ds.save_as(p, enforce_file_format=True)
    ingest_folder(ctx, out)
    [job] = tick(ctx)
    assert (job.series_instance_uid, job.state) == (uid, "queued"), job.error
    load_series(sorted(out.glob("*.dcm")))
