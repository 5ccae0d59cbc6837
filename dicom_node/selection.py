"""Series eligibility: the ``[selection]`` rules evaluated over one series' header facts.

Pure: no database, no files. :mod:`dicom_node.series_facts` reads the facts,
:mod:`dicom_node.ranking` chooses among the eligible series of a study, and
:mod:`dicom_node.scheduler` turns the answer into jobs.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from config.settings import SelectionRule, SelectionSettings

#: A header value as the rules see it: text, a number, or several of them (multi-valued).
Value = str | float | tuple[str | float, ...]

#: Attributes whose values never appear in a reason (reasons reach the log, the jobs table
#: and the audit trail, which carry no patient identifiers; PS3.15 E.1-1 basic profile).
IDENTIFYING = frozenset({
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "IssuerOfPatientID", "AccessionNumber", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "StudyID", "RequestingPhysician",
    "InstitutionName", "InstitutionAddress", "StationName", "MedicalRecordLocator"})


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules and the ranking know of a series, from its first and last instance.

    - ``attributes``: DICOM keyword -> value of the first instance (``ImageType``,
      ``ConvolutionKernel``, ... PS3.3 C.8.2.1 CT Image), numbers as floats.
    - ``axial_tilt_deg``: angle between the slice normal (row x column direction cosines of
      ImageOrientationPatient, PS3.3 C.7.6.2.1.1) and the patient's z axis: 0 axial, 90
      sagittal or coronal.
    - ``z_coverage_mm``: first to last slice position (ImagePositionPatient) along the
      normal; ``slice_spacing_mm`` = coverage / (slices - 1).
    - ``slice_thickness_mm``: SliceThickness, else the spacing.
    - ``z_range_mm``: the patient z of the first and last slice (low, high), to tell apart
      series that cover different parts of the spine.
    - ``error``: the headers could not be read (the series is not eligible).
    - ``spine_in_view``: what the spine check (:mod:`dicom_node.spine_coverage`, reading a
      few slices) saw: True, False, or None where it did not run; ``spine_detail`` says why.
    - ``in_plane_drift_mm``: how far the last slice's position lies from the first one's
      slice normal, within the image plane: 0 for a regular stack; more under a gantry tilt
      (GantryDetectorTilt), whose slices are sheared, not stacked along their normal.
    """

    series_instance_uid: str
    modality: str
    slices: int
    attributes: Mapping[str, Value] = field(default_factory=dict)
    series_number: int | None = None
    frame_of_reference_uid: str = ""
    slice_thickness_mm: float | None = None
    slice_spacing_mm: float | None = None
    z_coverage_mm: float | None = None
    axial_tilt_deg: float | None = None
    z_range_mm: tuple[float, float] | None = None
    error: str | None = None
    spine_in_view: bool | None = None
    spine_detail: str = ""
    in_plane_drift_mm: float | None = None

    @property
    def kernel(self) -> str:
        """ConvolutionKernel (first value: Siemens writes e.g. ``Br64\\3``)."""
        value = self.attributes.get("ConvolutionKernel")
        if isinstance(value, tuple):
            value = value[0] if value else ""
        return str(value or "").strip()


@dataclass(frozen=True)
class Eligibility:
    """The verdict of the rules; ``reasons`` names each rule that failed."""

    eligible: bool
    reasons: list[str] = field(default_factory=list)


def kernel_class(kernel: str, kernels: Mapping[str, Sequence[str]]) -> str | None:
    """The class (``bone``, ``soft``, ...) whose fnmatch pattern the kernel matches first."""
    name = kernel.strip().upper()
    if not name:
        return None
    for cls, patterns in kernels.items():
        if any(fnmatch.fnmatchcase(name, p.strip().upper()) for p in patterns):
            return cls
    return None


def builtin_rules(sel: SelectionSettings) -> list[tuple[str, SelectionRule]]:
    """The plain keys of ``[selection]`` as rules over derived values, with their key."""
    def rule(attribute: str, operator: str, value: float) -> SelectionRule:
        return SelectionRule(attribute=attribute, operator=operator, value=value)
    return [("selection.axial_tolerance_deg", rule("axial_tilt_deg", "max",
                                                   sel.axial_tolerance_deg)),
            ("selection.max_slice_mm", rule("slice_thickness_mm", "max", sel.max_slice_mm)),
            ("selection.max_slice_mm", rule("slice_spacing_mm", "max", sel.max_slice_mm)),
            ("selection.min_coverage_mm", rule("z_coverage_mm", "min", sel.min_coverage_mm))]


def evaluate(facts: SeriesFacts, sel: SelectionSettings) -> Eligibility:
    """Apply ``[selection]`` to one series: modality, slice count, then every rule."""
    modality = (facts.modality or "").upper()
    if modality not in sel.modalities:
        # Nothing else is worth reading of an SR, a PR or an MR when only CT is analysed.
        return Eligibility(False, [f"modality {modality or '(none)'} is not selected "
                                   f"(selection.modalities = {sel.modalities})"])
    reasons = []
    if facts.slices < sel.min_slices:
        reasons.append(f"{facts.slices} slices, fewer than selection.min_slices = "
                       f"{sel.min_slices}")
    if facts.error:
        return Eligibility(False, [*reasons, f"headers cannot be read: {facts.error}"])
    rules = builtin_rules(sel) + [(f"selection.rules[{i}]", r) for i, r in enumerate(sel.rules)]
    for source, rule in rules:
        failure = check(rule, value_of(facts, rule.attribute, sel.kernels))
        if failure:
            reasons.append(f"{failure} ({source}: {rule.describe()})" if
                           source.startswith("selection.rules") else f"{failure} ({source})")
    tilt = gantry_tilt(facts)
    if tilt:
        reasons.append(tilt)
    if facts.spine_in_view is False:
        reasons.append(f"no spine in view: {facts.spine_detail} (selection.spine_check)")
    return Eligibility(not reasons, reasons)


def gantry_tilt(facts: SeriesFacts) -> str | None:
    """Why a sheared stack (gantry tilt: slice positions not along the slice normal) is not
    analysed, or None. The loader (:mod:`pipeline.series_loader`) refuses such a stack rather
    than analyse the sheared volume as an upright one (vertebral heights and positions would
    be wrong by the shear); the selection says so before a job is queued."""
    from pipeline.series_loader import IN_PLANE_TOLERANCE_MM
    drift = facts.in_plane_drift_mm
    if drift is None or drift <= IN_PLANE_TOLERANCE_MM:
        return None
    declared = facts.attributes.get("GantryDetectorTilt")
    if isinstance(declared, tuple):
        declared = declared[0] if declared else None
    said = f", GantryDetectorTilt {_text(declared)} deg" if declared not in (None, "") else ""
    return (f"gantry tilt: slice positions drift {drift:.1f} mm within the image plane from the "
            f"first to the last slice (not along the slice normal{said}); a tilted stack is "
            "not resampled, it is refused")


def value_of(facts: SeriesFacts, attribute: str,
             kernels: Mapping[str, Sequence[str]]) -> Value | None:
    """A rule's operand: a derived value, or the DICOM attribute of the first instance."""
    if attribute == "kernel_class":
        return kernel_class(facts.kernel, kernels)
    if attribute == "slices":
        return float(facts.slices)
    if attribute in ("slice_thickness_mm", "slice_spacing_mm", "z_coverage_mm",
                     "axial_tilt_deg"):
        return getattr(facts, attribute)
    return facts.attributes.get(attribute)


def _number(value: float) -> str:
    return f"{round(value, 1):g}"


def _text(value: Value) -> str:
    if isinstance(value, tuple):
        return "\\".join(_text(v) for v in value)
    return _number(value) if isinstance(value, float) else str(value)


def check(rule: SelectionRule, value: Value | None) -> str | None:
    """None when ``value`` satisfies ``rule``; else why not (``ImageType DERIVED\\SECONDARY
    does not contain 'ORIGINAL'``). A missing value fails every rule but the negative ones."""
    op, want = rule.operator, rule.value
    name = rule.attribute
    if value is None or value == "" or value == ():
        return None if op in ("not_equals", "not_contains") else f"{name} is missing"
    values = value if isinstance(value, tuple) else (value,)
    shown = f"{name} (value not shown)" if name in IDENTIFYING else f"{name} {_text(value)}"
    if op in ("min", "max", "range"):
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            return f"{shown} is not a number"
        if any(math.isnan(n) for n in numbers):
            return f"{shown} is not a number"
        if op == "min" and min(numbers) < want:
            return f"{shown} is below {_number(want)}"
        if op == "max" and max(numbers) > want:
            return f"{shown} is above {_number(want)}"
        if op == "range" and not all(want[0] <= n <= want[1] for n in numbers):
            return f"{shown} is outside [{_number(want[0])}, {_number(want[1])}]"
        return None
    if op in ("contains", "not_contains"):
        needle = str(want).strip().upper()
        if isinstance(value, tuple):
            found = any(str(v).strip().upper() == needle for v in values)
        else:
            found = needle in _text(value).upper()
        if op == "contains" and not found:
            return f"{shown} does not contain {want!r}"
        if op == "not_contains" and found:
            return f"{shown} contains {want!r}"
        return None
    if op in ("equals", "not_equals"):
        equal = _equal(value, want)
        if op == "equals" and not equal:
            return f"{shown} is not {want!r}"
        if op == "not_equals" and equal:
            return f"{shown} is {want!r}"
        return None
    if op == "regex":
        return None if re.search(str(want), _text(value)) else \
            f"{shown} does not match {want!r}"
    raise ValueError(f"unknown operator {op}")  # the settings model admits no other


def _equal(value: Value, want: Any) -> bool:
    if isinstance(want, float) and not isinstance(value, tuple):
        try:
            return math.isclose(float(value), want, rel_tol=1e-6, abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return _text(value).strip().upper() == _text(want).strip().upper()
