"""Spine coverage (issue 27): a series whose slices hold no spine (a head CT, a CT of both
legs) is skipped with "no spine in view" before any job is queued; spine series are not:
phantoms of the cervical, thoracic and lumbar spine in all four patient positions, the real CTs
of the shared pack written as DICOM series, and the scanner-routed phantom study.

The head and the legs are drawn into a phantom's own DICOM headers (its patient, its geometry,
a new study), so that only the pixels differ from a spine series that passes.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from config import load_settings
from dicom_node.context import NodeContext
from dicom_node.spine_coverage import read_spine_coverage
from tests.helpers.indexing import ingest_folder, tick
from tests.pipeline.test_patient_positions import POSITIONS, flipped, write_series

SAMPLES, MIN_FRACTION = 9, 0.5  # the defaults of selection.spine_check_slices / _min_fraction


@pytest.fixture(scope="module")
def lumbar(tmp_path_factory) -> list[pydicom.Dataset]:
    """A phantom lumbar spine CT (L1-L5, 2 mm slices, 345 mm field), slices by position."""
    from pipeline.phantom import generate, write_study
    ph = generate(21, levels="L1-L5", fractures="none", acquisition=_ACQUISITION)
    out = tmp_path_factory.mktemp("lumbar")
    write_study(ph, out)
    slices = [pydicom.dcmread(p) for p in (out / "dicom").glob("*.dcm")]
    return sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))


_ACQUISITION = {"matrix": 192, "pixel_spacing": 1.8, "slice_spacing": 2.0,
                "slice_thickness": 2.0, "kernel": "B70f", "circle_padding": False}


def _pixel_xy(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Patient x and y (mm) of each pixel (PS3.3 C.7.6.2.1.1)."""
    ori = np.array([float(v) for v in ds.ImageOrientationPatient])
    pos = np.array([float(v) for v in ds.ImagePositionPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r = np.arange(int(ds.Rows))[:, None] * dr
    c = np.arange(int(ds.Columns))[None, :] * dc
    return pos[0] + c * ori[0] + r * ori[3], pos[1] + c * ori[1] + r * ori[4]


def head_hu(x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """A head at height ``z`` (0: the skull's centre): 5 mm scalp, 7 mm skull (1400 HU) of
    150 x 190 x 180 mm, brain inside, air around; no spine."""
    hu = np.full(x.shape, -1000.0)
    for (a, b, c), value in (((80.0, 100.0, 95.0), 40.0), ((75.0, 95.0, 90.0), 1400.0),
                             ((68.0, 88.0, 83.0), 35.0)):
        if abs(z) < c:
            f = np.sqrt(1 - (z / c) ** 2)
            hu[(x / (a * f)) ** 2 + (y / (b * f)) ** 2 <= 1] = value
    return hu


def legs_hu(x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Both thighs side by side (75 mm radius, 110 mm apart), a femur in each; no spine."""
    hu = np.full(x.shape, -1000.0)
    for cx in (-55.0, 55.0):
        hu[np.hypot(x - cx, y) <= 75] = 40.0
        femur = np.hypot(x - cx - 5, y + 10)
        hu[femur <= 14] = 1500.0
        hu[femur <= 8] = -50.0
    return hu


def redrawn_series(template: list[pydicom.Dataset], out: Path, draw, z_mm: np.ndarray) -> str:
    """A new study and series from the phantom's headers, one slice per ``z_mm`` (relative to
    the body part's centre), pixels ``draw(x, y, z)`` in HU around the field's centre."""
    out.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    src = template[0]
    x, y = _pixel_xy(src)
    x, y = x - x.mean(), y - y.mean()
    z0 = float(src.ImagePositionPatient[2])
    slope = float(src.get("RescaleSlope", 1) or 1)
    intercept = float(src.get("RescaleIntercept", 0) or 0)
    dtype = np.int16 if int(src.PixelRepresentation) else np.uint16
    info = np.iinfo(dtype)
    for k, z in enumerate(z_mm):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.FrameOfReferenceUID = frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient[2] = f"{z0 + float(z - z_mm[0]):.2f}"
        stored = np.clip(np.rint((draw(x, y, float(z)) - intercept) / slope), info.min, info.max)
        ds.PixelData = stored.astype(dtype).tobytes()
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
    return series


@pytest.fixture
def ctx(tmp_path):
    settings = load_settings(None, storage={"root": tmp_path / "store", "min_free_mb": 0,
                                            "fsync": False},
                             scheduler={"stable_seconds": 0})
    c = NodeContext.open(settings)
    yield c
    c.close()


def test_head_and_legs_are_skipped_no_spine_in_view_and_the_spine_is_not(ctx, lumbar,
                                                                         tmp_path):
    head = redrawn_series(lumbar, tmp_path / "head", head_hu, np.arange(-80.0, 90.0, 2.0))
    legs = redrawn_series(lumbar, tmp_path / "legs", legs_hu, np.arange(0.0, 160.0, 2.0))
    for name in ("head", "legs"):
        ingest_folder(ctx, tmp_path / name)
    jobs = {j.series_instance_uid: j for j in tick(ctx)}
    for uid in (head, legs):
        assert jobs[uid].state == "skipped", jobs[uid].error
        assert jobs[uid].error.startswith("no spine in view: vertebra-like bone (deep in the "
                                          "body, on its midline) in "), jobs[uid].error
        found = int(jobs[uid].error.split("midline) in ")[1].split()[0])
        assert found <= 2 and jobs[uid].error.endswith(
            f"of {SAMPLES} sampled slices (at least 50% needed) (selection.spine_check)"), \
            jobs[uid].error
    # The phantom whose headers drew them: chosen, the check passes.
    spine = tmp_path / "spine"
    spine.mkdir()
    for k, ds in enumerate(lumbar):
        ds.save_as(spine / f"{k:04d}.dcm", enforce_file_format=True)
    ingest_folder(ctx, spine)
    [job] = tick(ctx)
    assert (job.series_instance_uid, job.state) == (lumbar[0].SeriesInstanceUID, "queued")


def test_spine_check_off_lets_a_head_through(tmp_path, lumbar):
    settings = load_settings(None, storage={"root": tmp_path / "store", "min_free_mb": 0,
                                            "fsync": False},
                             scheduler={"stable_seconds": 0}, selection={"spine_check": False})
    c = NodeContext.open(settings)
    try:
        head = redrawn_series(lumbar, tmp_path / "head", head_hu, np.arange(-80.0, 90.0, 2.0))
        ingest_folder(c, tmp_path / "head")
        [job] = tick(c)
        assert (job.series_instance_uid, job.state) == (head, "queued")
    finally:
        c.close()


@pytest.mark.parametrize("levels", ["C2-C7", "T4-T9", "L1-L5"])
def test_phantom_spine_is_in_view_in_every_patient_position(tmp_path, levels):
    from pipeline.phantom import generate
    ph = generate(21, levels=levels, fractures="none", acquisition=_ACQUISITION)
    for position, axes in POSITIONS.items():
        paths = write_series(flipped(ph.ct, axes), tmp_path / position)
        coverage = read_spine_coverage(paths, SAMPLES, MIN_FRACTION)
        assert coverage is not None and coverage.in_view, (levels, position, coverage)
        assert coverage.with_spine >= SAMPLES - 1, (levels, position, coverage)


def _real_cases():
    from pipeline.realdata.pack import default_pack_dir, iter_pack_cases
    pack = default_pack_dir()
    if pack is None:
        return []
    return list(iter_pack_cases(pack))


@pytest.mark.slow
def test_real_spine_ct_is_in_view(tmp_path):
    """Every real CT of the pack (cervical to lumbar, cropped to the spine or a whole chest),
    written as an axial DICOM series as a scanner would send it."""
    from pipeline.realdata.to_dicom import write_ct_series
    cases = _real_cases()
    if not cases:
        pytest.skip("the real-spine pack is not here (SPINE_NODE_REAL_SPINE)")
    seen = []
    for case in cases:
        paths = write_ct_series(case.ct, tmp_path / case.case_id, case.case_id)
        coverage = read_spine_coverage(paths, SAMPLES, MIN_FRACTION)
        assert coverage is not None and coverage.in_view, (case.case_id, coverage)
        seen.append((case.case_id, coverage.with_spine))
        for p in paths:
            os.unlink(p)
    assert len(seen) >= 5, seen
