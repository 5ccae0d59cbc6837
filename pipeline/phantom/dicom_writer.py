"""The phantom as a DICOM CT series: CT Image Storage, one file per slice, explicit VR little endian.

Modules written (PS3.3 A.3, CT Image IOD): Patient, General Study, Patient Study, General Series,
Frame of Reference, General Equipment, General Acquisition, General Image, Image Plane, Image
Pixel, CT Image, VOI LUT, SOP Common. Every UID is derived from the seed and every date is fixed
(no clock), so the same seed gives byte-identical files.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pipeline.phantom.generator import Phantom, derive_uid

SOFTWARE_VERSION = "spine-node phantom 1"
IMPLEMENTATION_VERSION_NAME = "SPINENODE_PH1"


def _study_datetime(seed: int) -> tuple[str, str]:
    day = _dt.date(2020, 1, 1) + _dt.timedelta(days=seed % 1800)
    sec = 8 * 3600 + (seed * 7919) % (9 * 3600)
    return day.strftime("%Y%m%d"), f"{sec // 3600:02d}{(sec // 60) % 60:02d}{sec % 60:02d}"


def _fmt(v: float) -> str:
    """A decimal string (DS) of at most 16 characters."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def base_dataset(ph: Phantom) -> Dataset:
    seed = ph.seed
    acq = ph.acquisition
    grid = ph.grid
    date, time = _study_datetime(seed)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.AcquisitionDate = date
    ds.ContentDate = date
    ds.StudyTime = time
    ds.SeriesTime = time
    ds.AcquisitionTime = time
    ds.ContentTime = time
    ds.AccessionNumber = f"PH{seed % 10**14}"[:16]
    ds.Modality = "CT"
    ds.Manufacturer = "spine-node"
    ds.InstitutionName = "Synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT spine (synthetic phantom)"
    ds.SeriesDescription = f"Phantom seed {seed} {acq.kernel} {acq.slice_thickness:g}mm"
    ds.ManufacturerModelName = "spine-node phantom"
    ds.PatientName = f"PHANTOM^SEED{seed}"
    ds.PatientID = f"PH{seed:08d}"[:64]
    birth = _dt.date(1930, 1, 1) + _dt.timedelta(days=(seed * 104729) % (60 * 365))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "F" if seed % 2 else "M"
    age = max(int((_dt.date(2020, 1, 1) + _dt.timedelta(days=seed % 1800) - birth).days // 365.25), 1)
    ds.PatientAge = f"{min(age, 999):03d}Y"
    ds.BodyPartExamined = "SPINE"
    ds.SliceThickness = _fmt(acq.slice_thickness if not ph.meta.get("iso") else grid.spacing[2])
    ds.KVP = _fmt(acq.kvp)
    ds.SpacingBetweenSlices = _fmt(grid.spacing[2])
    ds.DataCollectionDiameter = _fmt(500.0)
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.ReconstructionDiameter = _fmt(grid.spacing[0] * grid.shape[2])
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = _fmt(150.0)
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = int(acq.tube_current)
    ds.Exposure = int(acq.tube_current)
    ds.ConvolutionKernel = acq.kernel
    ds.PatientPosition = "HFS" if (acq.head_first or ph.meta.get("iso")) else "FFS"
    ds.StudyInstanceUID = ph.uids["study_instance_uid"]
    ds.SeriesInstanceUID = ph.uids["series_instance_uid"]
    ds.StudyID = f"{seed % 10**8}"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_fmt(grid.sign[0]), "0", "0", "0", _fmt(grid.sign[1]), "0"]
    ds.FrameOfReferenceUID = ph.uids["frame_of_reference_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.shape[1]
    ds.Columns = grid.shape[2]
    ds.PixelSpacing = [_fmt(grid.spacing[1]), _fmt(grid.spacing[0])]  # row spacing (y), column spacing (x)
    ds.BitsAllocated = 16
    if acq.signed:
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
    if acq.circle_padding and not ph.meta.get("iso"):
        # pixels outside the reconstruction circle (generator.py writes -2048 HU, or raw 0)
        ds.PixelPaddingValue = -2048 if acq.signed else 0
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["400", "40"]
    ds.WindowWidth = ["1800", "400"]
    ds.WindowCenterWidthExplanation = ["BONE", "SOFT TISSUE"]
    return ds


def write_dicom_series(ph: Phantom, out_dir: Path | str) -> list[Path]:
    """Write one CT Image Storage file per slice into ``out_dir``; returns the paths (instance order)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acq, grid = ph.acquisition, ph.grid
    arr = sitk.GetArrayViewFromImage(ph.ct)  # (k, j, i), int16 HU
    ds = base_dataset(ph)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    nz = grid.shape[0]
    z = grid.axis(2)
    order = np.argsort(z, kind="stable")
    if not acq.instance_ascending:
        order = order[::-1]
    paths = []
    for n, k in enumerate(order, start=1):
        k = int(k)
        uid = derive_uid(ph.seed, f"sop/{k}")
        meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = n
        pos = [grid.origin[0], grid.origin[1], z[k]]
        ds.ImagePositionPatient = [_fmt(p) for p in pos]
        ds.SliceLocation = _fmt(z[k])
        sl = np.asarray(arr[k])
        if acq.signed:
            px = sl.astype("<i2", copy=False)
        else:
            px = np.clip(sl.astype(np.int32) + 1024, 0, 4095).astype("<u2")
        ds.PixelData = px.tobytes()
        if acq.shuffled_names:
            name = "IM" + hashlib.sha1(uid.encode()).hexdigest()[:12].upper() + ".dcm"
        else:
            name = f"CT{n:06d}.dcm"
        p = out_dir / name
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    assert len(paths) == nz
    return paths
