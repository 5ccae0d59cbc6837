"""Load a CT series from DICOM files into one SimpleITK volume (DESIGN.md "Pipeline" step 1).

Checks before anything is computed, each failing with a :class:`SeriesLoadError` whose message a
person understands: one series, one frame of reference, one orientation, one matrix and pixel
spacing, positions on a line along the slice normal, no two slices at one position, regular
slice spacing (a gap of whole missing slices is named as such), pixel data of the right length.
Compressed transfer syntaxes (JPEG family, JPEG-LS, JPEG 2000, RLE, deflate) are decoded by
pydicom with the pylibjpeg plugins. Enhanced CT (multi-frame) is read frame by frame from its
functional groups.

The volume is in Hounsfield units (rescale slope/intercept applied), in patient LPS: origin
= position of the first slice, direction columns = row direction, column direction, slice normal
(the slices are sorted by increasing position along the normal). It is int16 where every slice's
slope and intercept are whole numbers and its values fit (routine CT: exact, half the memory of
float32, which long series need: issue 28), float32 otherwise; the pipeline reads either.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

#: Orientation cosines may differ by this much between slices.
ORIENTATION_TOLERANCE = 1e-4
#: Slice spacing may vary by this fraction of the median spacing (and at least this many mm).
SPACING_TOLERANCE = 0.05
SPACING_TOLERANCE_MM = 0.01
#: Two slices closer than this along the normal are "at one position" (mm).
DUPLICATE_TOLERANCE_MM = 1e-3
#: In-plane drift between slices (gantry tilt) larger than this is refused (mm).
IN_PLANE_TOLERANCE_MM = 0.05
#: The largest volume the loader builds (float32: 4 GiB). Larger Rows x Columns x slices are
#: refused before any allocation: compressed pixel data is not length-checked up front, so a
#: header claiming 65535 x 65535 would otherwise ask for tens of GB (issue 7, hostile input).
MAX_VOXELS = 2**30
#: Elements larger than this are read from the file only when used (pydicom ``defer_size``).
DEFER_BYTES = 64 * 1024
#: Hounsfield values an int16 volume holds.
INT16_RANGE = (-32768, 32767)


class SeriesLoadError(ValueError):
    """The files do not make one regular volume; the message says why."""


@dataclass
class LoadedSeries:
    """A series as one volume plus its headers (see docs/internal-interfaces.md)."""

    image: sitk.Image
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    headers: list[Dataset] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.image.GetSpacing())  # type: ignore[return-value]


@dataclass
class _Slice:
    position: np.ndarray          # ImagePositionPatient (mm)
    orientation: np.ndarray       # 6 cosines
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    columns: int
    slope: float
    intercept: float
    header: Dataset
    path: Path
    frame: int | None = None      # index in a multi-frame instance
    z: float = 0.0


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if abs(x - round(x)) > 1e-9 else f"{x:.1f}"


def _require(ds: Dataset, keyword: str, path: Path):
    value = ds.get(keyword)
    if value is None or value == "":
        raise SeriesLoadError(f"{path.name}: {keyword} is missing")
    return value


def _floats(value, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise SeriesLoadError(f"{path.name}: {what} {value!r} is not numeric") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesLoadError(f"{path.name}: {what} needs {n} numbers, got {list(value)!r}")
    return arr


def _expected_pixel_bytes(ds: Dataset, frames: int) -> int:
    bits = int(ds.get("BitsAllocated", 16))
    samples = int(ds.get("SamplesPerPixel", 1))
    return (int(ds.Rows) * int(ds.Columns) * samples * bits * frames + 7) // 8


def _check_pixel_data(ds: Dataset, path: Path, frames: int) -> None:
    if "PixelData" not in ds:
        raise SeriesLoadError(f"{path.name}: the instance has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesLoadError(f"{path.name}: {ds.get('SamplesPerPixel')} samples per pixel; "
                              "a CT volume needs grey-scale images")
    ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if ts is None or not pydicom.uid.UID(ts).is_compressed:
        elem = ds.get_item("PixelData", keep_deferred=True)  # its length, not its deferred value
        have = len(elem.value) if elem.value is not None else int(elem.length)
        need = _expected_pixel_bytes(ds, frames)
        if have < need:
            raise SeriesLoadError(f"{path.name}: pixel data is {have} bytes, "
                                  f"{int(ds.Rows)}x{int(ds.Columns)} x {frames} frame(s) at "
                                  f"{int(ds.get('BitsAllocated', 16))} bits needs {need}")


def _rescale(item: Dataset | None, ds: Dataset) -> tuple[float, float]:
    src = item if item is not None else ds
    slope = float(src.get("RescaleSlope", 1) or 1)
    intercept = float(src.get("RescaleIntercept", 0) or 0)
    return slope, intercept


def _slices_of(ds: Dataset, path: Path) -> list[_Slice]:
    rows = int(_require(ds, "Rows", path))
    columns = int(_require(ds, "Columns", path))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_pixel_data(ds, path, frames)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        pos = _floats(_require(ds, "ImagePositionPatient", path), 3, "ImagePositionPatient", path)
        ori = _floats(_require(ds, "ImageOrientationPatient", path), 6,
                      "ImageOrientationPatient", path)
        sp = _floats(_require(ds, "PixelSpacing", path), 2, "PixelSpacing", path)
        slope, intercept = _rescale(None, ds)
        return [_Slice(pos, ori, (sp[0], sp[1]), rows, columns, slope, intercept, ds, path)]
    # Enhanced (multi-frame) CT: geometry from the shared and per-frame functional groups.
    shared = (ds.SharedFunctionalGroupsSequence[0]
              if "SharedFunctionalGroupsSequence" in ds else Dataset())
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        raise SeriesLoadError(f"{path.name}: {frames} frames but "
                              f"{0 if per_frame is None else len(per_frame)} per-frame groups")

    def group(item: Dataset, keyword: str) -> Dataset | None:
        for src in (item, shared):
            seq = src.get(keyword)
            if seq:
                return seq[0]
        return None

    out = []
    for k, item in enumerate(per_frame):
        where = f"frame {k + 1}"
        plane = group(item, "PlanePositionSequence")
        orient = group(item, "PlaneOrientationSequence")
        measures = group(item, "PixelMeasuresSequence")
        if plane is None or orient is None or measures is None:
            raise SeriesLoadError(f"{path.name} {where}: plane position, orientation or "
                                  "pixel measures are missing")
        pos = _floats(_require(plane, "ImagePositionPatient", path), 3,
                      f"{where} ImagePositionPatient", path)
        ori = _floats(_require(orient, "ImageOrientationPatient", path), 6,
                      f"{where} ImageOrientationPatient", path)
        sp = _floats(_require(measures, "PixelSpacing", path), 2, f"{where} PixelSpacing", path)
        slope, intercept = _rescale(group(item, "PixelValueTransformationSequence"), ds)
        out.append(_Slice(pos, ori, (sp[0], sp[1]), rows, columns, slope, intercept, ds, path,
                          frame=k))
    return out


def _check_consistent(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise SeriesLoadError(
                f"mixed image sizes: {first.path.name} is {first.rows}x{first.columns}, "
                f"{s.path.name} is {s.rows}x{s.columns}")
        if np.max(np.abs(s.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise SeriesLoadError(
                f"mixed orientations: {s.path.name} has ImageOrientationPatient "
                f"{[round(v, 4) for v in s.orientation]}, {first.path.name} has "
                f"{[round(v, 4) for v in first.orientation]}")
        if max(abs(s.pixel_spacing[0] - first.pixel_spacing[0]),
               abs(s.pixel_spacing[1] - first.pixel_spacing[1])) > 1e-4:
            raise SeriesLoadError(f"mixed pixel spacing: {s.path.name} {s.pixel_spacing} vs "
                                  f"{first.path.name} {first.pixel_spacing}")
    row = first.orientation[:3]
    col = first.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or \
            abs(float(np.dot(row, col))) > 1e-3:
        raise SeriesLoadError(f"ImageOrientationPatient {list(first.orientation)} is not two "
                              "orthogonal unit vectors")
    normal = np.cross(row, col)
    return row, col, normal


def _check_positions(slices: list[_Slice], row, col, normal) -> float:
    """Sort along the normal; refuse duplicates, drift and gaps. Returns the slice spacing."""
    for s in slices:
        s.z = float(np.dot(s.position, normal))
    slices.sort(key=lambda s: s.z)
    zs = np.array([s.z for s in slices])
    # Several slices at one position.
    groups: dict[int, list[_Slice]] = {}
    run_start = 0
    for i in range(1, len(slices) + 1):
        if i == len(slices) or zs[i] - zs[run_start] > DUPLICATE_TOLERANCE_MM:
            if i - run_start > 1:
                groups[run_start] = slices[run_start:i]
            run_start = i
    if groups:
        worst = max(groups.values(), key=len)
        more = f" (and {len(groups) - 1} more positions)" if len(groups) > 1 else ""
        raise SeriesLoadError(f"{len(worst)} slices share position z={_fmt(worst[0].z)} mm"
                              f"{more}: duplicate or overlapping acquisitions in one series")
    if len(slices) < 2:
        raise SeriesLoadError("the series has a single slice; a volume needs at least two")
    # Positions must lie on a line along the normal (no gantry tilt / shear).
    base = slices[0].position
    for s in slices[1:]:
        d = s.position - base
        drift = float(np.hypot(np.dot(d, row), np.dot(d, col)))
        if drift > IN_PLANE_TOLERANCE_MM:
            raise SeriesLoadError(
                f"{s.path.name}: slice positions drift {drift:.2f} mm within the image plane "
                "(gantry tilt or a stack of differently placed slices); not supported")
    steps = np.diff(zs)
    spacing = float(np.median(steps))
    tol = max(SPACING_TOLERANCE * spacing, SPACING_TOLERANCE_MM)
    bad = np.nonzero(np.abs(steps - spacing) > tol)[0]
    if bad.size:
        i = int(bad[0])
        gap = float(steps[i])
        ratio = gap / spacing
        if ratio > 1.5 and abs(ratio - round(ratio)) * spacing <= tol:
            missing = int(round(ratio)) - 1
            raise SeriesLoadError(
                f"missing slices: {missing} slice(s) missing between z={_fmt(zs[i])} and "
                f"z={_fmt(zs[i + 1])} mm (spacing {_fmt(spacing)} mm)"
                + (f"; {bad.size} irregular gaps in all" if bad.size > 1 else ""))
        raise SeriesLoadError(
            f"irregular slice spacing: {_fmt(gap)} mm between z={_fmt(zs[i])} and "
            f"z={_fmt(zs[i + 1])} mm, expected {_fmt(spacing)} mm"
            + (f"; {bad.size} irregular gaps in all" if bad.size > 1 else ""))
    return spacing


def _frame_pixels(s: _Slice, cache: dict[Path, np.ndarray]) -> np.ndarray:
    arr = cache.get(s.path)
    if arr is None:
        try:
            arr = pixel_array(s.header)  # not cached on the dataset (memory)
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            ts = getattr(s.header, "file_meta", {}).get("TransferSyntaxUID", "?")
            name = getattr(pydicom.uid.UID(ts), "name", ts) if ts != "?" else ts
            raise SeriesLoadError(f"{s.path.name}: pixel data cannot be decoded "
                                  f"({name}): {exc}") from None
        if s.frame is not None:
            cache[s.path] = arr
    if s.frame is not None:
        arr = arr[s.frame] if arr.ndim == 3 else arr
    if arr.shape != (s.rows, s.columns):
        raise SeriesLoadError(f"{s.path.name}: pixel data has shape {arr.shape}, header says "
                              f"{s.rows}x{s.columns}")
    return arr


def load_series(paths: Iterable[str | Path]) -> LoadedSeries:
    """Read the files of one series into one HU volume (int16 or float32); see the module
    docstring."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesLoadError("no files were given")
    slices: list[_Slice] = []
    study = series = frame_of_ref = modality = None
    for path in paths:
        try:
            # Pixel data is read when the volume is filled, one slice at a time: all of a long
            # series' pixel data at once would double the loader's memory.
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        except Exception as exc:  # noqa: BLE001
            raise SeriesLoadError(f"{path.name}: not a readable DICOM file ({exc})") from None
        this_series = str(ds.get("SeriesInstanceUID", ""))
        this_for = str(ds.get("FrameOfReferenceUID", ""))
        if series is None:
            study, series = str(ds.get("StudyInstanceUID", "")), this_series
            frame_of_ref, modality = this_for, str(ds.get("Modality", ""))
        elif this_series != series:
            raise SeriesLoadError(f"{path.name} belongs to series {this_series}, not {series}")
        elif this_for != frame_of_ref:
            raise SeriesLoadError(f"more than one frame of reference: {path.name} has "
                                  f"{this_for or 'none'}, the first file {frame_of_ref or 'none'}")
        try:
            slices.extend(_slices_of(ds, path))
        except SeriesLoadError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, IndexError,
                OverflowError) as exc:  # non-conformant values (found by fuzzing, issue 7)
            raise SeriesLoadError(f"{path.name}: unusable image header "
                                  f"({type(exc).__name__}: {exc})"[:500]) from None

    row, col, normal = _check_consistent(slices)
    dz = _check_positions(slices, row, col, normal)

    first = slices[0]
    voxels = len(slices) * first.rows * first.columns
    if voxels > MAX_VOXELS or first.rows < 1 or first.columns < 1:
        raise SeriesLoadError(
            f"{len(slices)} slices of {first.rows}x{first.columns} make "
            f"{voxels * 4 / 2**30:.1f} GiB as float32; the loader takes 1 to "
            f"{MAX_VOXELS} voxels ({MAX_VOXELS * 4 // 2**30} GiB): Rows/Columns are wrong or the "
            "series is not a CT volume")
    if not (np.isfinite(dz) and dz > 0) or not all(
            np.isfinite(v) and v > 0 for v in first.pixel_spacing) or \
            not np.all(np.isfinite(first.position)):
        raise SeriesLoadError(f"unusable geometry: pixel spacing {first.pixel_spacing}, slice "
                              f"spacing {dz} mm, first position {list(first.position)}")
    exact = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    volume = np.empty((len(slices), first.rows, first.columns),
                      dtype=np.int16 if exact else np.float32)
    cache: dict[Path, np.ndarray] = {}
    for k, s in enumerate(slices):
        pixels = _frame_pixels(s, cache)
        if volume.dtype == np.int16:
            hu = pixels.astype(np.int32) * int(s.slope) + int(s.intercept)
            if hu.size and (hu.min() < INT16_RANGE[0] or hu.max() > INT16_RANGE[1]):
                volume = volume.astype(np.float32)  # values beyond int16: float32 from here on
            else:
                volume[k] = hu
        if volume.dtype == np.float32:
            np.multiply(pixels, s.slope, out=volume[k], casting="unsafe")
            volume[k] += s.intercept
        if s.frame is None and "PixelData" in s.header:
            del s.header.PixelData  # copied: free it now, not after the whole series
    cache.clear()

    image = sitk.GetImageFromArray(volume, isVector=False)
    del volume  # SimpleITK holds its own copy; peak memory is two volumes plus one slice
    image.SetOrigin(tuple(float(v) for v in first.position))
    # SimpleITK spacing is (x = along a row, y = along a column, z); PixelSpacing is (row, col).
    image.SetSpacing((float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), dz))
    direction = np.column_stack([row, col, normal])
    image.SetDirection(tuple(float(v) for v in direction.flatten()))

    headers: list[Dataset] = []
    ordered_paths: list[Path] = []
    seen: set[int] = set()
    for s in slices:
        if id(s.header) not in seen and "PixelData" in s.header:
            del s.header.PixelData  # headers carry no pixel data (interface contract)
        seen.add(id(s.header))
        headers.append(s.header)
        ordered_paths.append(s.path)
    return LoadedSeries(image=image, study_instance_uid=study or "",
                        series_instance_uid=series or "", frame_of_reference_uid=frame_of_ref or "",
                        modality=modality or "", headers=headers, paths=ordered_paths)
