"""The vertebrae's heights where a viewer can show them: on the key image (TID 1501 groups of the
fracture report, :mod:`pipeline.outputs.sr`).

A TID 1411 group (one per vertebra, referencing its SEG segment) cannot hold measurements with
spatial coordinates (PS3.16 TID 1419; highdicom refuses them). Viewers such as OHIF list and draw
a measurement only where it is INFERRED FROM an image-referenced SCOORD, and fail on a group that
has none. So each vertebra also gets one TID 1501 "Measurement and Qualitative Evaluation Group"
with the same Tracking Identifier and Tracking UID (the same finding, PS3.16 TID 1500, "Tracking
Unique Identifier"), the same Finding Site, and:

- the anterior, middle and posterior heights (DCM 121207 "Height" with the topographical
  modifier, DESIGN.md "Outputs"), each INFERRED FROM a SCOORD POLYLINE on the key image: the
  segment between the two Genant points it was measured between (A1-A2, M1-M2, P1-P2, paper
  section 2.3.3), or, where the heights come from the mask rather than the points, the
  vertebra's box on the key image;

A vertebra that was not assessed has no measurement to hang coordinates on; its second group is
a TID 1410 "Planar ROI" group instead, whose region is an ELLIPSE in the vertebra's box on the
key image: the viewer shows where it is, and the report still states no height, grade or
fracture status for it. (A TID 300 NUM without a value, qualified "Measurement not attempted",
would say the same, but highdicom cannot read such a NUM back. A 4-corner POLYLINE box would be
taken by OHIF for its rectangle tool: it would then offer to "track" these regions alone.)

The one-line statement a reader sees beside the vertebra (``"L1: fracture, Genant grade 2
(moderate), wedge deformity"``) is a TEXT qualitative evaluation named DCM 121106 "Comment" in
the TID 1411 group; :func:`comment` writes it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from highdicom.sr import FindingSite, Measurement
from pydicom.sr.coding import Code

from pipeline.findings import GenantGrade, VertebraFinding
from pipeline.levels import level
from pipeline.outputs import codes

if TYPE_CHECKING:
    from pipeline.outputs.key_image import KeyImagePlane

#: TEXT qualitative evaluation with the vertebra's finding in words (OHIF shows it as the label).
COMMENT = Code("121106", "DCM", "Comment")
#: Half the side (mm) of the box that stands for a vertebra with no voxel on the key image.
_HALF_BOX_MM = 5.0

_GRADE_WORD = {GenantGrade.NORMAL: "normal", GenantGrade.MILD: "mild",
               GenantGrade.MODERATE: "moderate", GenantGrade.SEVERE: "severe"}
#: Height, its topographical modifier and the two Genant points it runs between.
_HEIGHTS = (("anterior", codes.ANTERIOR, ("A1", "A2")),
            ("middle", codes.MIDDLE, ("M1", "M2")),
            ("posterior", codes.POSTERIOR, ("P1", "P2")))


def comment(f: VertebraFinding) -> str:
    """The vertebra's finding in one line, as the SR's codes state it."""
    if not f.assessed:
        return f"{f.name}: not assessed ({f.not_assessed_reason})"
    grade = GenantGrade(f.genant_grade)
    words = f"Genant grade {int(grade)} ({_GRADE_WORD[grade]})"
    if f.fractured:
        morphology = codes.MORPHOLOGY_CODES[f.morphology].meaning.lower()
        return f"{f.name}: fracture, {words}, {morphology}"
    return f"{f.name}: no fracture, {words}"


def comment_item(f: VertebraFinding) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=COMMENT, value=comment(f),
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _coordinates(graphic_type: str, data: np.ndarray, plane: "KeyImagePlane"
                 ) -> hd.sr.CoordinatesForMeasurement:
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=graphic_type, graphic_data=np.asarray(data, dtype=np.float32),
        source_image=hd.sr.SourceImageForRegion(plane.sop_class_uid, plane.sop_instance_uid))


def _outline(f: VertebraFinding, plane: "KeyImagePlane") -> np.ndarray:
    """The vertebra's box on the key image (a small box around its centroid where the plane
    has none of its voxels) as a closed POLYLINE."""
    outline = plane.outline(f.label)
    if outline is not None:
        return outline
    c, r = plane.to_pixel(f.centroid_mm)
    d = _HALF_BOX_MM / plane.pixel_mm
    return plane.box(c - d, r - d, c + d, r + d)


def _ellipse(f: VertebraFinding, plane: "KeyImagePlane") -> np.ndarray:
    """The ELLIPSE in the vertebra's box: the major axis' end points, then the minor axis'."""
    box = _outline(f, plane)
    (c0, r0), (c1, r1) = box.min(axis=0), box.max(axis=0)
    cm, rm = (c0 + c1) / 2, (r0 + r1) / 2
    horizontal = np.array([(c0, rm), (c1, rm)])
    vertical = np.array([(cm, r0), (cm, r1)])
    axes = (horizontal, vertical) if c1 - c0 >= r1 - r0 else (vertical, horizontal)
    return np.concatenate(axes).astype(np.float32)


def _where(f: VertebraFinding, plane: "KeyImagePlane") -> hd.sr.CoordinatesForMeasurement:
    return _coordinates("POLYLINE", _outline(f, plane), plane)


def _height_coordinates(f: VertebraFinding, points: tuple[str, str], plane: "KeyImagePlane"
                        ) -> hd.sr.CoordinatesForMeasurement:
    kp = f.keypoints_mm
    if f.grading_source == "keypoints" and kp and all(p in kp for p in points):
        return _coordinates("POLYLINE", plane.line(kp[points[0]], kp[points[1]]), plane)
    return _where(f, plane)


def key_image_group(f: VertebraFinding, tracking: hd.sr.TrackingIdentifier,
                    plane: "KeyImagePlane", algorithm_id: hd.sr.AlgorithmIdentification,
                    finding_type: Code) -> (hd.sr.MeasurementsAndQualitativeEvaluations
                                            | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
    """The group of one vertebra on the key image (see the module docstring): TID 1501 with
    its heights, or TID 1410 with its region where it has none."""
    vertebra = codes.vertebra_code(level(f.label))
    if not (f.assessed and f.heights_mm is not None):
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=finding_type,
            referenced_region=hd.sr.ImageRegion(
                graphic_type="ELLIPSE", graphic_data=_ellipse(f, plane),
                source_image=hd.sr.SourceImageForRegion(plane.sop_class_uid,
                                                        plane.sop_instance_uid)),
            finding_sites=[FindingSite(vertebra)], algorithm_id=algorithm_id)
    measurements: list[Measurement] = []
    for attribute, modifier, points in _HEIGHTS:
        measurements.append(Measurement(
            name=codes.HEIGHT, value=round(float(getattr(f.heights_mm, attribute)), 2),
            unit=codes.MILLIMETER,
            finding_sites=[FindingSite(vertebra, topographical_modifier=modifier)],
            referenced_coordinates=[_height_coordinates(f, points, plane)]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=finding_type,
        finding_sites=[FindingSite(vertebra)], algorithm_id=algorithm_id,
        measurements=measurements)


def vertebrae_found(plane: "KeyImagePlane") -> Measurement:
    """A report without vertebrae: "Number of vertebrae found" = 0, INFERRED FROM the whole
    plane of the key image (where none is outlined)."""
    return Measurement(name=codes.VERTEBRAE_FOUND, value=0.0, unit=codes.NO_UNITS,
                       referenced_coordinates=[_coordinates("POLYLINE", plane.box(*plane.extent),
                                                            plane)])


def groups_by_tracking_uid(groups: Sequence) -> dict[str, list]:
    """Measurement groups of one report by Tracking UID, in order (one finding, several
    groups)."""
    out: dict[str, list] = {}
    for g in groups:
        out.setdefault(str(g.tracking_uid), []).append(g)
    return out
