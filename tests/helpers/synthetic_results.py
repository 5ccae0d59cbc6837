"""A small synthetic CT series and a hand-made analysis of it, for the result-object tests.

Five vertebrae T12-L4 as boxes on a 96x96x60 grid (1.25 x 1.25 x 2.5 mm); L1 has a wedge
fracture (anterior height reduced, Genant grade 2). Written with pydicom as one CT file per slice,
so that everything downstream (SEG references, dciodvfy, C-STORE) sees real instances.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.findings import GenantGrade, Heights, Morphology, VertebraFinding

ROWS = COLS = 96
N_SLICES = 60
PIXEL_MM = 1.25
SLICE_MM = 2.5
ORIGIN = (-60.0, -60.0, 0.0)
#: (label, name, z centre mm, fractured, grade, morphology, heights (A, M, P))
VERTEBRAE = [
    (19, "T12", 128.0, False, GenantGrade.NORMAL, Morphology.NORMAL, (22.0, 22.0, 22.0)),
    (20, "L1", 100.0, True, GenantGrade.MODERATE, Morphology.WEDGE, (14.0, 18.0, 22.0)),
    (21, "L2", 72.0, False, GenantGrade.NORMAL, Morphology.NORMAL, (22.0, 22.5, 22.0)),
    (22, "L3", 44.0, False, GenantGrade.NORMAL, Morphology.NORMAL, (23.0, 23.0, 22.5)),
    (23, "L4", 16.0, False, GenantGrade.NORMAL, Morphology.NORMAL, (23.0, 23.0, 23.0)),
]


@dataclass
class SyntheticSeries:
    """Has the attributes of ``pipeline.series_loader.LoadedSeries`` the outputs use."""

    image: sitk.Image
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    headers: list
    paths: list[Path]


@dataclass
class SyntheticResult:
    """Has the attributes of ``pipeline.run.AnalysisResult`` the outputs use."""

    study_instance_uid: str
    series_instance_uid: str
    vertebrae: list[VertebraFinding]
    label_map: sitk.Image
    timings_s: dict[str, float] = field(default_factory=dict)
    #: ``pipeline.numbering.Numbering`` or None (the outputs then state no numbering).
    numbering: object | None = None

    def summary(self) -> dict:
        return {"study_instance_uid": self.study_instance_uid,
                "series_instance_uid": self.series_instance_uid,
                "vertebrae": [v.summary() for v in self.vertebrae],
                "timings_s": dict(self.timings_s)}


def _volumes() -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, labels uint8), both (slice, row, column)."""
    z = ORIGIN[2] + np.arange(N_SLICES) * SLICE_MM
    y = ORIGIN[1] + np.arange(ROWS) * PIXEL_MM
    x = ORIGIN[0] + np.arange(COLS) * PIXEL_MM
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    hu = np.full(zz.shape, -1000, dtype=np.int16)
    hu[(xx / 55) ** 2 + (yy / 50) ** 2 < 1] = 40          # soft-tissue body
    labels = np.zeros(zz.shape, dtype=np.uint8)
    for label, _name, zc, _frac, _g, _m, (ha, _hm, hp) in VERTEBRAE:
        body_x = np.abs(xx) <= 18
        body_y = (yy >= -5) & (yy <= 25)                   # LPS: anterior = smaller y
        # Height falls linearly from posterior (y=25: hp) to anterior (y=-5: ha).
        height = ha + (hp - ha) * (yy + 5) / 30
        body_z = np.abs(zz - zc) <= height / 2
        body = body_x & body_y & body_z
        arch = (np.abs(xx) <= 8) & (yy > 25) & (yy <= 45) & (np.abs(zz - zc) <= 8)
        mask = body | arch
        labels[mask] = label
        hu[mask] = 250
        hu[mask & ((np.abs(xx) > 16) | (yy < -3) | (yy > 23))] = 900  # cortical shell
    return hu, labels


def write_series(out_dir: Path, *, seed: int = 0) -> tuple[list[Path], str, str]:
    """Write the CT series; returns (paths in slice order, study UID, series UID)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hu, _labels = _volumes()
    rng = np.random.default_rng(seed)
    study_uid = generate_uid(entropy_srcs=[f"study-{seed}"])
    series_uid = generate_uid(entropy_srcs=[f"series-{seed}"])
    for_uid = generate_uid(entropy_srcs=[f"for-{seed}"])
    now = dt.datetime(2026, 1, 2, 10, 30, 0)
    paths = []
    for k in range(N_SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"sop-{seed}-{k}"])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out_dir / f"ct{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "Synthetic"
        ds.ManufacturerModelName = "Phantom"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyDescription = "CT spine"
        ds.SeriesDescription = "Spine bone 2.5mm"
        ds.PatientName = "Phantom^Spine"
        ds.PatientID = f"PHANTOM{seed}"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "SPINE"
        ds.SliceThickness = SLICE_MM
        ds.KVP = 120
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + k * SLICE_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = ORIGIN[2] + k * SLICE_MM
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 400
        ds.WindowWidth = 1800
        noise = rng.normal(0, 10, size=(ROWS, COLS)).astype(np.int16)
        ds.PixelData = (hu[k] + noise).astype(np.int16).tobytes()
        path = out_dir / f"ct{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, study_uid, series_uid


def load(paths: list[Path]):
    """The series as ``pipeline.series_loader.load_series`` gives it (a stand-in reader where
    that module is not in the checkout)."""
    try:
        from pipeline.series_loader import load_series
    except ImportError:
        return _load(paths)
    return load_series(paths)


def _load(paths: list[Path]) -> SyntheticSeries:
    """Read the series back like the series loader does (sorted along z, HU float32)."""
    dsets = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    arr = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                    for d in dsets])
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin([float(v) for v in dsets[0].ImagePositionPatient])
    img.SetSpacing([float(dsets[0].PixelSpacing[1]), float(dsets[0].PixelSpacing[0]), SLICE_MM])
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in
               sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))]
    return SyntheticSeries(image=img, study_instance_uid=dsets[0].StudyInstanceUID,
                           series_instance_uid=dsets[0].SeriesInstanceUID,
                           frame_of_reference_uid=dsets[0].FrameOfReferenceUID, modality="CT",
                           headers=headers, paths=sorted(paths))


def analysis(series) -> SyntheticResult:
    """The result a perfect analysis of the synthetic series would give."""
    _hu, labels = _volumes()
    label_map = sitk.GetImageFromArray(labels)
    label_map.CopyInformation(series.image)
    findings = []
    for label, name, zc, frac, grade, morph, (ha, hm, hp) in VERTEBRAE:
        loss = 1 - min(ha, hm, hp) / max(ha, hm, hp)
        findings.append(VertebraFinding(
            label=label, name=name, centroid_mm=(0.0, 12.0, zc), fractured=frac,
            genant_grade=grade, morphology=morph, heights_mm=Heights(ha, hm, hp), height_loss=loss))
    return SyntheticResult(series.study_instance_uid, series.series_instance_uid, findings, label_map,
                           {"total": 1.0})


def dciodvfy_errors(ds, path: Path) -> tuple[list[str], str]:
    """Write ``ds`` to ``path``, run dicom3tools' ``dciodvfy``; (its Error lines, whole output)."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        import pytest
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output
