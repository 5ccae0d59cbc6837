"""One phantom in four patient positions gives the same findings at the same patient
coordinates (issue 27, "Geometry for every position").

The series is rewritten as head-first supine (the phantom's own), feet-first supine, head-first
prone and feet-first prone: pixel axes flipped and ImageOrientationPatient / ImagePositionPatient
written from the flipped geometry (PS3.3 C.7.6.2.1.1), so that the physical image is the same.
Each goes through the DICOM loader and the whole pipeline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.registry import read_manifest

pytestmark = pytest.mark.skipif(
    not {"localization", "segmentation", "keypoints"} <= set(read_manifest()),
    reason="model weights not installed")

#: Index axes flipped (x, y, z) for each position, from the phantom's head-first supine series.
POSITIONS = {"HFS": (), "FFS": (0, 2), "HFP": (0, 1), "FFP": (1, 2)}


def flipped(image: sitk.Image, axes) -> sitk.Image:
    """The same physical image with the given index axes reversed."""
    arr = sitk.GetArrayFromImage(image)
    d = np.array(image.GetDirection()).reshape(3, 3)
    size, sp = np.array(image.GetSize()), np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    for ax in axes:
        origin = origin + d[:, ax] * sp[ax] * (size[ax] - 1)
        d[:, ax] = -d[:, ax]
        arr = np.flip(arr, axis=2 - ax)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetSpacing(tuple(sp))
    out.SetOrigin(tuple(origin))
    out.SetDirection(tuple(d.ravel()))
    return out


def write_series(image: sitk.Image, out: Path) -> list[Path]:
    arr = np.clip(np.rint(sitk.GetArrayFromImage(image)), -32768, 32767).astype("<i2")
    d = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True)
    paths = []
    for k in range(arr.shape[0]):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.PixelSpacing, ds.SliceThickness = [f"{sy:.4f}", f"{sx:.4f}"], f"{sz:.3f}"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = arr[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = out / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from pipeline.phantom import generate
    from pipeline.run import analyse
    from pipeline.series_loader import load_series

    ph = generate(8301, levels="T11-L3", acquisition={
        "matrix": 256, "pixel_spacing": 1.0, "slice_spacing": 2.5, "slice_thickness": 2.5,
        "n_slices": 60})
    image = sitk.Cast(ph.ct, sitk.sitkFloat32)
    out = {}
    for name, axes in POSITIONS.items():
        series = load_series(write_series(flipped(image, axes), tmp_path_factory.mktemp(name) / "s"))
        res = analyse(series, "cpu")
        out[name] = (series, res)
    return ph, out


@pytest.mark.slow
def test_every_position_finds_the_same_levels_at_the_truths_coordinates(results):
    ph, out = results
    truth = {v["name"]: np.array(v["centroid_mm"]) for v in ph.gt["vertebrae"] if not v.get("partial")}
    reference = {f.name: np.array(f.centroid_mm) for f in out["HFS"][1].vertebrae}
    assert set(truth) <= set(reference)
    for name, (_series, res) in out.items():
        found = {f.name: np.array(f.centroid_mm) for f in res.vertebrae}
        assert set(found) == set(reference), name
        for level, p in found.items():
            # the same point as head-first supine, within the resampling's half voxel
            assert np.linalg.norm(p - reference[level]) <= 1.25, (name, level)
            if level in truth:
                assert np.linalg.norm(p - truth[level]) <= 4.0, (name, level)
        grades = [int(f.genant_grade) for f in res.vertebrae]
        assert grades == [int(f.genant_grade) for f in out["HFS"][1].vertebrae], name


def test_every_position_labels_the_same_voxels_in_patient_space(results):
    _ph, out = results
    ref = out["HFS"][1].label_map
    for name, (_series, res) in out.items():
        back = sitk.Resample(res.label_map, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        a, b = sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ref)
        inter = np.logical_and(a == b, b > 0).sum()
        assert inter / max((b > 0).sum(), 1) >= 0.97, name


def test_the_loader_keeps_the_headers_geometry(results):
    _ph, out = results
    for name, (series, _res) in out.items():
        ds = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
        first = series.image.TransformIndexToPhysicalPoint((0, 0, 0))
        assert np.allclose(first, [float(v) for v in ds.ImagePositionPatient], atol=1e-3), name
