"""A NIfTI CT written as an axial DICOM CT series (one CT Image Storage file per slice).

For trying real research data (VerSe layout, NIfTI) through ``spine-node process`` or through
the node's C-STORE path exactly as a scanner's series would arrive. The CT is reoriented to
the axial LPS layout (a permutation of its axes), stored as signed 16-bit HU (rescale 1, 0).
The data sets carry no patient identity: the patient name and ID are the case id.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pipeline.realdata.truth import axial_lps


def _uid(case_id: str, what: str) -> str:
    h = hashlib.sha256(f"spine-node-real/{case_id}/{what}".encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def _ds(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")[:16]


def write_ct_series(ct: sitk.Image, out_dir: Path, case_id: str) -> list[Path]:
    """Write ``ct`` (HU, any orientation) as an axial DICOM series into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img = axial_lps(ct)
    arr = np.clip(np.rint(sitk.GetArrayFromImage(img)), -32768, 32767).astype("<i2")
    sx, sy, sz = img.GetSpacing()
    d = np.array(img.GetDirection()).reshape(3, 3)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.PatientName = case_id[:64]
    ds.PatientID = case_id[:64]
    # Type 2 attributes of the Patient, General Study, General Series and General Equipment
    # modules (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1, C.7.5.1): present, empty where unknown.
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.Manufacturer = ""
    ds.InstanceNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.KVP = ""
    ds.AcquisitionNumber = 1
    ds.StudyInstanceUID = _uid(case_id, "study")
    ds.SeriesInstanceUID = _uid(case_id, "series")
    ds.FrameOfReferenceUID = _uid(case_id, "for")
    ds.StudyDescription = "Real CT (research data)"
    ds.SeriesDescription = case_id[:64]
    ds.SeriesNumber = 1
    ds.SliceThickness = _ds(sz)
    ds.ImageOrientationPatient = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [_ds(sy), _ds(sx)]
    ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    paths = []
    for k in range(arr.shape[0]):
        uid = _uid(case_id, f"sop/{k}")
        meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        ds.ImagePositionPatient = [_ds(p) for p in pos]
        ds.PixelData = arr[k].tobytes()
        path = out_dir / f"CT{k + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
