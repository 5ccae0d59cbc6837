"""Read a stable series' :class:`~dicom_node.selection.SeriesFacts` from the file store: the
headers (``stop_before_pixels``) of its first and last instance only.

Runs in the scheduler when the series is stable, never in the C-STORE handler (whose time is
the sender's). The index keeps instances in InstanceNumber order, so the first and last
instance are the ends of the stack for the scanners' usual numbering; the loader still sorts
every slice by position when the series is analysed.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.selection import SeriesFacts, Value

#: Attributes the ranking reads whatever the rules name.
_ALWAYS = ("ImageType", "ConvolutionKernel", "SeriesNumber", "SliceThickness",
           "GantryDetectorTilt")


def read_series_facts(series_instance_uid: str, modality: str, slices: int,
                      paths: Sequence[Path], keywords: Iterable[str]) -> SeriesFacts:
    """Facts of the series whose instance files are ``paths`` (in InstanceNumber order).

    ``keywords``: the DICOM attributes the rules name. A header that cannot be read gives
    facts with ``error`` set (the series is then not eligible, with that reason).
    """
    if not paths:
        return SeriesFacts(series_instance_uid, modality, slices, error="no instance files")
    try:
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        last = first if len(paths) == 1 else pydicom.dcmread(paths[-1], stop_before_pixels=True)
        return _facts(series_instance_uid, modality, slices, first, last, keywords)
    except Exception as exc:  # noqa: BLE001 - a header that cannot be used: ineligible, why
        return SeriesFacts(series_instance_uid, modality, slices,
                           error=f"{type(exc).__name__}: {exc}"[:300])


def _facts(series_instance_uid: str, modality: str, slices: int, first: Dataset,
           last: Dataset, keywords: Iterable[str]) -> SeriesFacts:
    attributes = {k: v for k in dict.fromkeys([*_ALWAYS, *keywords])
                  if (v := _value(_find(first, k))) is not None}
    series_number = attributes.get("SeriesNumber")
    geometry = _geometry(first, last, slices)
    thickness = _number(attributes.get("SliceThickness"))
    if thickness is None:
        thickness = geometry["slice_spacing_mm"]
    return SeriesFacts(
        series_instance_uid, modality, slices, attributes,
        series_number=int(series_number) if isinstance(series_number, float) else None,
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""),
        slice_thickness_mm=thickness, **geometry)


def _find(ds: Dataset, keyword: str):
    """The attribute at the top level, else in the shared functional groups (Enhanced CT,
    PS3.3 C.7.6.16: e.g. SliceThickness in the Pixel Measures Sequence)."""
    value = ds.get(keyword)
    if value is not None:
        return value
    for group in ds.get("SharedFunctionalGroupsSequence") or []:
        for element in group:
            if element.VR == "SQ" and element.value:
                found = element.value[0].get(keyword)
                if found is not None:
                    return found
    return None


def _value(raw) -> Value | None:
    if raw is None or isinstance(raw, (bytes, Dataset)) or \
            isinstance(raw, pydicom.sequence.Sequence):
        return None
    if isinstance(raw, (MultiValue, list, tuple)):
        items = tuple(v for v in (_value(x) for x in raw) if v is not None)
        return items or None
    if isinstance(raw, (int, float)):
        return float(raw)
    text = str(raw).strip()
    return text or None


def _number(value: Value | None) -> float | None:
    if isinstance(value, tuple):
        value = value[0] if value else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _frame_plane(ds: Dataset, frame: int):
    """ImageOrientationPatient and ImagePositionPatient (PS3.3 C.7.6.2) of a classic image,
    or of one frame of an Enhanced CT image (Plane Orientation/Position functional groups)."""
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orientation is not None and position is not None:
        return orientation, position
    groups = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])
    per_frame = groups[frame] if groups else None
    for source in (per_frame, shared[0] if shared else None):
        if source is None:
            continue
        if orientation is None and source.get("PlaneOrientationSequence"):
            orientation = source.PlaneOrientationSequence[0].get("ImageOrientationPatient")
        if position is None and source.get("PlanePositionSequence"):
            position = source.PlanePositionSequence[0].get("ImagePositionPatient")
    return orientation, position


def _geometry(first: Dataset, last: Dataset, slices: int) -> dict:
    none = {"slice_spacing_mm": None, "z_coverage_mm": None, "axial_tilt_deg": None,
            "z_range_mm": None, "in_plane_drift_mm": None}
    try:
        orientation, p0 = _frame_plane(first, 0)
        _, p1 = _frame_plane(last, -1)
        if orientation is None or p0 is None or p1 is None:
            return none
        cosines = np.asarray([float(v) for v in orientation], dtype=float)
        a, b = np.asarray([float(v) for v in p0]), np.asarray([float(v) for v in p1])
    except (TypeError, ValueError, IndexError):
        return none
    if cosines.shape != (6,) or a.shape != (3,) or b.shape != (3,) or \
            not (np.isfinite(cosines).all() and np.isfinite(a).all() and np.isfinite(b).all()):
        return none
    normal = np.cross(cosines[:3], cosines[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        return none
    normal /= length
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    coverage = abs(float(np.dot(b - a, normal)))
    # A gantry-tilted acquisition keeps axial images but shears the stack: each slice's
    # position moves within the image plane (PS3.3 C.7.6.2.1.1, GantryDetectorTilt C.8.2.1).
    drift = float(np.linalg.norm((b - a) - np.dot(b - a, normal) * normal))
    spacing = coverage / (slices - 1) if slices > 1 else None
    if spacing is None:
        spacing = _number(_value(_find(first, "SpacingBetweenSlices")))
    return {"slice_spacing_mm": spacing, "z_coverage_mm": coverage,
            "axial_tilt_deg": tilt, "z_range_mm": (min(a[2], b[2]), max(a[2], b[2])),
            "in_plane_drift_mm": drift}
