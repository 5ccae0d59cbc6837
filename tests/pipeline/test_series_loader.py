"""pipeline.series_loader: a regular series becomes one HU volume with DICOM geometry; broken
series are refused with a message a person understands."""
from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from pipeline.series_loader import SeriesLoadError, load_series
from tests.helpers import dcmtk, write_ct_series


def test_regular_series_geometry_and_hu(tmp_path):
    w = write_ct_series(tmp_path, n_slices=12, rows=32, columns=40, pixel_spacing=(0.7, 0.9),
                        slice_spacing=2.5, origin=(-10.0, -20.0, 100.0))
    # Files given in reverse order: the loader sorts by position along the normal.
    s = load_series(list(reversed(w.paths)))
    img = s.image
    assert img.GetSize() == (40, 32, 12)
    assert np.allclose(img.GetSpacing(), (0.9, 0.7, 2.5))
    assert np.allclose(img.GetOrigin(), (-10.0, -20.0, 100.0))
    assert np.allclose(img.GetDirection(), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert img.GetPixelIDTypeAsString() == "16-bit signed integer"  # whole slope and intercept
    arr = __import__("SimpleITK").GetArrayViewFromImage(img)
    raw = pydicom.dcmread(w.paths[3]).pixel_array
    assert np.allclose(arr[3], raw.astype(np.float32) - 1024)  # slope 1, intercept -1024
    assert s.paths == w.paths
    assert all("PixelData" not in h for h in s.headers)
    assert (s.study_instance_uid, s.series_instance_uid) == (w.study_instance_uid,
                                                             w.series_instance_uid)
    assert s.modality == "CT"


def test_fractional_rescale_or_values_beyond_int16_give_float32(tmp_path):
    """int16 holds a series only where it is exact: a fractional slope, or values that a whole
    slope and intercept push beyond int16, give float32 HU equal to slope * raw + intercept."""
    import SimpleITK as sitk

    w = write_ct_series(tmp_path / "frac", n_slices=4, rows=8, columns=8)
    for path in w.paths:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "0.5"
        ds.save_as(path)
    s = load_series(w.paths)
    assert s.image.GetPixelIDTypeAsString() == "32-bit float"
    raw = pydicom.dcmread(w.paths[2]).pixel_array.astype(np.float64)
    assert np.allclose(sitk.GetArrayViewFromImage(s.image)[2], raw * 0.5 - 1024)

    w = write_ct_series(tmp_path / "big", n_slices=4, rows=8, columns=8)
    for path in w.paths:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "40"  # a whole slope, but 40 * raw overflows int16 from some slice on
        ds.save_as(path)
    s = load_series(w.paths)
    assert s.image.GetPixelIDTypeAsString() == "32-bit float"
    for k in (0, 3):
        raw = pydicom.dcmread(w.paths[k]).pixel_array.astype(np.float64)
        assert np.allclose(sitk.GetArrayViewFromImage(s.image)[k], raw * 40 - 1024)


def test_feet_first_descending_positions_sorted(tmp_path):
    w = write_ct_series(tmp_path, n_slices=5, z_positions=[0, -1, -2, -3, -4])
    s = load_series(w.paths)
    assert np.isclose(s.image.GetOrigin()[2], -4.0)
    assert [float(h.ImagePositionPatient[2]) for h in s.headers] == [-4, -3, -2, -1, 0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(z_positions=[0.0] * 30), "30 slices share position z=0.0 mm"),
    (dict(z_positions=[0, 1, 2, 4, 5, 6]), "missing slices: 1 slice(s) missing between z=2.0"),
    (dict(z_positions=[0, 1, 2, 2.6, 3.6]), "irregular slice spacing"),
])
def test_bad_positions_refused(tmp_path, kwargs, message):
    w = write_ct_series(tmp_path, rows=16, columns=16, **kwargs)
    with pytest.raises(SeriesLoadError) as err:
        load_series(w.paths)
    assert message in str(err.value)


def test_mixed_orientation_refused(tmp_path):
    def tilt(ds, k):
        if k == 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]
    w = write_ct_series(tmp_path, n_slices=4, rows=16, columns=16, mutate=tilt)
    with pytest.raises(SeriesLoadError, match="mixed orientations"):
        load_series(w.paths)


def test_short_and_missing_pixel_data_refused(tmp_path):
    def short(ds, k):
        if k == 1:
            ds.PixelData = ds.PixelData[:100]
    w = write_ct_series(tmp_path / "short", n_slices=3, rows=16, columns=16, mutate=short)
    with pytest.raises(SeriesLoadError, match=r"pixel data is 100 bytes.*needs 512"):
        load_series(w.paths)

    def missing(ds, k):
        if k == 0:
            del ds.PixelData
    w = write_ct_series(tmp_path / "missing", n_slices=3, rows=16, columns=16, mutate=missing)
    with pytest.raises(SeriesLoadError, match="has no pixel data"):
        load_series(w.paths)


def test_two_frames_of_reference_refused(tmp_path):
    def other_for(ds, k):
        if k == 2:
            ds.FrameOfReferenceUID = "1.2.3.4"
    w = write_ct_series(tmp_path, n_slices=4, rows=16, columns=16, mutate=other_for)
    with pytest.raises(SeriesLoadError, match="more than one frame of reference"):
        load_series(w.paths)


def test_compressed_transfer_syntaxes_decode_to_the_same_volume(tmp_path):
    w = write_ct_series(tmp_path / "raw", n_slices=4, rows=32, columns=32)
    reference = __import__("SimpleITK").GetArrayFromImage(load_series(w.paths).image)
    out = tmp_path / "enc"
    out.mkdir()
    # RLE with pydicom; JPEG lossless (process 14 SV1) and JPEG-LS lossless with dcmtk.
    variants = {}
    rle = []
    for p in w.paths:
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        q = out / f"rle-{p.name}"
        ds.save_as(q)
        rle.append(q)
    variants["rle"] = rle
    for tool, flag in (("dcmcjpeg", "+e1"), ("dcmcjpls", "+el")):
        paths = []
        for p in w.paths:
            q = out / f"{tool}-{p.name}"
            subprocess.run([dcmtk(tool), flag, str(p), str(q)], check=True, capture_output=True)
            paths.append(q)
        variants[tool] = paths
    for name, paths in variants.items():
        ts = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ts.is_compressed, name
        arr = __import__("SimpleITK").GetArrayFromImage(load_series(paths).image)
        assert np.array_equal(arr, reference), name


def test_enhanced_ct_multiframe_geometry_from_functional_groups(tmp_path):
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    def item(**kw):
        ds = Dataset()
        for k, v in kw.items():
            setattr(ds, k, v)
        return ds

    frames, rows, cols = 6, 8, 10
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID, ds.Modality = generate_uid(), "CT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SharedFunctionalGroupsSequence = [item(
        PixelMeasuresSequence=[item(PixelSpacing=[0.5, 0.6], SliceThickness=2.0)],
        PlaneOrientationSequence=[item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
        PixelValueTransformationSequence=[item(RescaleIntercept=-1000, RescaleSlope=2,
                                               RescaleType="HU")])]
    # Frames stored in descending z: the loader sorts them.
    ds.PerFrameFunctionalGroupsSequence = [
        item(PlanePositionSequence=[item(ImagePositionPatient=[1.0, 2.0, 10.0 - 2 * k])])
        for k in range(frames)]
    pixels = np.arange(frames * rows * cols, dtype=np.int16).reshape(frames, rows, cols)
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)

    s = load_series([path])
    img = s.image
    assert img.GetSize() == (cols, rows, frames)
    assert np.allclose(img.GetSpacing(), (0.6, 0.5, 2.0))
    assert np.allclose(img.GetOrigin(), (1.0, 2.0, 0.0))
    arr = __import__("SimpleITK").GetArrayFromImage(img)
    assert np.allclose(arr[0], pixels[-1] * 2.0 - 1000)  # lowest z first
    assert len(s.headers) == frames and len(s.paths) == frames
