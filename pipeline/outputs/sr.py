"""The fracture report: Comprehensive 3D SR, TID 1500 Measurement Report (DESIGN.md "Outputs").

Content tree (PS3.16 TID 1500, built with :class:`highdicom.sr.MeasurementReport`):

- TID 1001 Observation Context: the algorithm as Device observer (TID 1004), the patient subject;
- Procedure Reported: LN 25045-6 "CT unspecified body region" (CID 100), i.e. the source CT;
- TID 1411 Volumetric ROI Measurements and Qualitative Evaluations, one group per vertebra with a
  segment in the SEG: Tracking Identifier/UID (same as the SEG segment's), Referenced Segment,
  Finding = the SEG segment's property type, Finding Site = the vertebra's code, Algorithm
  Identification (TID 4019), and

  - TID 300 measurements: the height loss 1 - min/max in % (private code, DESIGN.md "Pipeline"
    step 4); DCM 121207 "Height" of the body with the topographical modifier SCT 255549009
    anterior / 26216008 central / 255551008 posterior (HA, HM, HP, in mm) are in the vertebra's
    second group, below (here only when there is no key image to draw them on);
  - a TEXT "Comment" (DCM 121106): the finding in one line, "L1: fracture, Genant grade 2
    (moderate), wedge deformity" (what OHIF shows beside the vertebra);
  - qualitative evaluations: SCT 72704001 "Fracture" = Present / Absent, the Genant grade and
    the morphology (private codes, declared in the Coding Scheme Identification Sequence);
  - a vertebra that was not assessed (cut by the field of view, C1/C2, no usable heights) has
    no measurement, no grade and no morphology: its one evaluation is "Fracture" = a private
    "Not assessed: <why>" code, so the report never states a finding nobody made;
  - where the level numbering is uncertain (:mod:`pipeline.numbering`), a TEXT qualitative
    evaluation (TID 1411 row "Qualitative Evaluation", value type TEXT) with the statement
    "Vertebral level numbering uncertain: <reason>": the finding site code rests on it;
- per vertebra, a second group with the same Tracking Identifier and UID, on the key image
  (:mod:`pipeline.outputs.sr_key_image`): TID 1501 with the three heights, each INFERRED FROM a
  SCOORD POLYLINE between its two Genant points on the key image; for a vertebra not assessed,
  TID 1410 whose region is an ELLIPSE around it there. Viewers (OHIF) need an image-referenced
  SCOORD per finding to list and draw it, and a TID 1411 group cannot carry one;
- the level numbering, anchored or uncertain, at the report level: TID 1500 "Qualitative
  Evaluations" (UMLS C0034375) holding a CODE (private "Vertebral level numbering" = Anchored /
  Uncertain) and a TEXT item with the statement;
- in the same container, where the study context says so
  (:class:`pipeline.outputs.study_context.StudyContext`): a TEXT "Part of a multi-part study"
  (this report covers one part of the spine; the study's other parts are reported separately)
  and a TEXT "Replaces an earlier result", whose SR is also in the Predecessor Documents
  Sequence (PS3.3 C.17.2);
- no vertebra at all: one TID 1501 group, Finding Site "Spine", "Vertebra" = Absent;
- a vertebra reported without voxels in the label map (cannot happen with the current pipeline,
  kept for robustness) gets a TID 1501 group with the same content but no region reference.

IHE AI Results: Verification Flag UNVERIFIED (no person has verified it), Completion Flag
COMPLETE, Contributing Equipment naming the algorithm.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    FindingSite,
    Measurement,
    QualitativeEvaluation,
    TrackingIdentifier,
)

from pipeline.findings import GenantGrade, Morphology, VertebraFinding
from pipeline.levels import level
from pipeline.numbering import Numbering
from pipeline.outputs import codes, sr_key_image
from pipeline.outputs.common import AlgorithmInfo, OutputIdentity, derived_uid, new_instance_arguments
from pipeline.outputs.study_context import StudyContext

if TYPE_CHECKING:
    from pydicom import Dataset

    from pipeline.outputs.key_image import KeyImagePlane
    from pipeline.outputs.seg import PlannedSegment


def _algorithm_id(algorithm: AlgorithmInfo) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, manufacturer=algorithm.manufacturer,
        family=codes.ARTIFICIAL_INTELLIGENCE)


def _group_content(f: VertebraFinding, algorithm: AlgorithmInfo, heights: bool = True) -> dict:
    """Finding, site, measurements and evaluations of one vertebra (shared by TID 1411/1501);
    without the three heights where ``heights`` is False (they are then in the vertebra's group
    on the key image, :mod:`pipeline.outputs.sr_key_image`)."""
    vertebra = codes.vertebra_code(level(f.label))
    if not f.assessed:
        why = codes.NOT_ASSESSED_CODES[f.not_assessed_reason or "heights not measurable"]
        return dict(
            finding_type=vertebra,
            finding_category=codes.ANATOMICAL_STRUCTURE,
            finding_sites=[FindingSite(vertebra)],
            algorithm_id=_algorithm_id(algorithm),
            measurements=[],
            qualitative_evaluations=[QualitativeEvaluation(codes.FRACTURE, why)],
        )
    measurements: list[Measurement] = []
    if heights and f.heights_mm is not None:
        for modifier, value in (
            (codes.ANTERIOR, f.heights_mm.anterior),
            (codes.MIDDLE, f.heights_mm.middle),
            (codes.POSTERIOR, f.heights_mm.posterior),
        ):
            measurements.append(Measurement(
                name=codes.HEIGHT, value=round(float(value), 2), unit=codes.MILLIMETER,
                finding_sites=[FindingSite(vertebra, topographical_modifier=modifier)]))
    if f.height_loss is not None:
        # No Finding Site of its own: the group's is the vertebra's (a NUM with a child but
        # no SCOORD is one that OHIF skips with a warning).
        measurements.append(Measurement(
            name=codes.HEIGHT_LOSS, value=round(100.0 * float(f.height_loss), 1),
            unit=codes.PERCENT))
    evaluations = [
        QualitativeEvaluation(codes.FRACTURE, codes.PRESENT if f.fractured else codes.ABSENT),
        QualitativeEvaluation(codes.GENANT_GRADE,
                              codes.GENANT_GRADE_CODES[GenantGrade(f.genant_grade)]),
        QualitativeEvaluation(codes.FRACTURE_MORPHOLOGY,
                              codes.MORPHOLOGY_CODES[Morphology(f.morphology)]),
    ]
    return dict(
        finding_type=codes.FRACTURE if f.fractured else vertebra,
        finding_category=(codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE if f.fractured
                          else codes.ANATOMICAL_STRUCTURE),
        finding_sites=[FindingSite(vertebra)],
        algorithm_id=_algorithm_id(algorithm),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _tracking(f: VertebraFinding, uid: str) -> TrackingIdentifier:
    return TrackingIdentifier(uid=uid, identifier=f"{f.name} vertebra")


def _referenced_segment(seg: "Dataset", number: int) -> hd.sr.ReferencedSegment:
    """TID 1411 row "Referenced Segment" for segment ``number`` of ``seg``.

    highdicom's ``ReferencedSegment.from_segmentation`` reads each frame's segment number from
    the Per-Frame Functional Groups; a SEG with a single segment carries the Segment
    Identification in the Shared Functional Groups instead (PS3.3 C.7.6.16.1), which it cannot
    read. That case references the segment and the source instances of the SEG's Referenced
    Series Sequence (highdicom's own fallback, "method B")."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" not in shared:
        return hd.sr.ReferencedSegment.from_segmentation(seg, number)
    sources = [hd.sr.SourceImageForSegmentation(item.ReferencedSOPClassUID,
                                                item.ReferencedSOPInstanceUID)
               for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    return hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID,
                                   sop_instance_uid=seg.SOPInstanceUID,
                                   segment_number=number, source_images=sources)


def _numbering_text(numbering: Numbering) -> hd.sr.TextContentItem:
    """The numbering statement as a TEXT qualitative evaluation."""
    return hd.sr.TextContentItem(
        name=codes.LEVEL_NUMBERING_STATEMENT, value=numbering.statement[:MAX_TEXT_CHARS],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _numbering_evaluations(numbering: Numbering) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations" (UMLS C0034375): the numbering's status (CODE) and
    its statement (TEXT)."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(
            name=codes.LEVEL_NUMBERING, value=codes.LEVEL_NUMBERING_CODES[numbering.status],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        _numbering_text(numbering),
    ])
    return container


#: The statement is UT (no practical limit); this keeps a runaway reason readable.
MAX_TEXT_CHARS = 1024


def _add_context(report: "Dataset", context: StudyContext) -> None:
    """The context's statements as TEXT items of the report's one "Qualitative Evaluations"
    container (TID 1500 allows one), created where the numbering did not."""
    wanted = codes.QUALITATIVE_EVALUATIONS
    container = next((item for item in report.ContentSequence
                      if (item.ConceptNameCodeSequence[0].CodeValue,
                          item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
                      == (wanted.value, wanted.scheme_designator)), None)
    if container is None:
        container = hd.sr.ContainerContentItem(
            name=wanted, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence([])
        report.ContentSequence.append(container)
    for name, text in ((codes.STUDY_PART_STATEMENT, context.part_statement()),
                       (codes.REPLACES_STATEMENT, context.replaces_statement())):
        if text:
            container.ContentSequence.append(hd.sr.TextContentItem(
                name=name, value=text[:MAX_TEXT_CHARS],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def read_context_statements(dataset: "Dataset") -> dict[str, str]:
    """What our SR says of its place in the study: ``{"part": ..., "replaces": ...}`` (the
    keys it states)."""
    names = {codes.STUDY_PART_STATEMENT.value: "part", codes.REPLACES_STATEMENT.value: "replaces"}
    out: dict[str, str] = {}
    wanted = codes.QUALITATIVE_EVALUATIONS
    for item in dataset.ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if (concept.CodeValue, concept.CodingSchemeDesignator) != (
                wanted.value, wanted.scheme_designator):
            continue
        for child in item.ContentSequence:
            key = names.get(child.ConceptNameCodeSequence[0].CodeValue)
            if child.ValueType == "TEXT" and key:
                out[key] = str(child.TextValue)
    return out


def build_sr(
    headers: Sequence["Dataset"],
    seg: "Dataset | None",
    segments: Sequence["PlannedSegment"],
    unsegmented: Sequence[tuple[VertebraFinding, str]],
    identity: OutputIdentity,
    algorithm: AlgorithmInfo,
    numbering: Numbering | None = None,
    context: StudyContext | None = None,
    key_image: "tuple[Dataset, KeyImagePlane] | None" = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR instance; ``unsegmented`` are (finding, tracking UID) of vertebrae without voxels.

    With ``key_image`` (the key image and its :class:`~pipeline.outputs.key_image.KeyImagePlane`)
    each vertebra's heights are measurements INFERRED FROM lines on it, in a TID 1501 group
    beside its TID 1411 group (:mod:`pipeline.outputs.sr_key_image`), and the key image is part
    of the evidence; without it they stay in the TID 1411 group.

    With no vertebra at all the report has one "no vertebra found" group: it still records
    that the series was analysed and nothing was found. ``numbering`` (the analysis's
    :class:`pipeline.numbering.Numbering`) goes to the report level, and into every vertebra's
    group where it is uncertain. ``context`` (where the result stands in its study) adds its
    statements at the report level and the SR it replaces as a predecessor document.
    """
    groups: list = []
    plane = key_image[1] if key_image is not None else None
    reported: list[tuple[VertebraFinding, str, dict]] = []
    for s in segments:
        content = _group_content(s.finding, algorithm, heights=plane is None)
        reported.append((s.finding, s.tracking_uid, content))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(s.finding, s.tracking_uid),
            referenced_segment=_referenced_segment(seg, s.number), **content))
    for f, uid in unsegmented:
        content = _group_content(f, algorithm, heights=plane is None)
        reported.append((f, uid, content))
        content = {k: v for k, v in content.items() if k != "finding_category"}
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(f, uid), **content))
    for g, (f, _uid, _content) in zip(groups, reported):
        g[0].ContentSequence.append(sr_key_image.comment_item(f))
    if numbering is not None and numbering.uncertain:
        for g in groups:
            g[0].ContentSequence.append(_numbering_text(numbering))
    if plane is not None:
        for f, uid, content in reported:
            groups.append(sr_key_image.key_image_group(
                f, _tracking(f, uid), plane, _algorithm_id(algorithm), content["finding_type"]))

    if not groups:
        # TID 1500 needs one group: "no vertebra found" as a spine-level evaluation.
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derived_uid(identity.sop_instance_uid, "no-vertebra"),
                identifier="no vertebra found"),
            finding_type=codes.VERTEBRA,
            finding_sites=[FindingSite(codes.SPINE)],
            algorithm_id=_algorithm_id(algorithm),
            qualitative_evaluations=[QualitativeEvaluation(codes.VERTEBRA, codes.ABSENT)],
            measurements=[sr_key_image.vertebrae_found(plane)] if plane is not None else None))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DEVICE_OBSERVER,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid, name=algorithm.name, manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.model_name, serial_number=algorithm.device_serial_number),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.CT_PROCEDURE,
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
    )
    if numbering is not None:
        report[0].ContentSequence.append(_numbering_evaluations(numbering))
    if context is not None and context.says_anything:
        _add_context(report[0], context)
    return hd.sr.Comprehensive3DSR(
        # PS3.3 C.17.2: present only with an item (an empty sequence is an error).
        previous_versions=list(context.predecessors()) or None if context is not None else None,
        evidence=[*headers, *([seg] if seg is not None else []),
                  *([key_image[0]] if key_image is not None else [])],
        content=report[0],
        **new_instance_arguments(identity, algorithm),
        series_description=identity.series_description,
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[codes.private_coding_scheme()],
        contributing_equipment=[algorithm.contributing_equipment()],
    )


@dataclass(frozen=True)
class ReportedVertebra:
    """One vertebra as our SR says it (what a receiving system reads back).

    ``assessed`` is False for a vertebra reported as not assessed; it then has no grade, no
    morphology and no fracture flag (``None``), and ``not_assessed`` says why.
    """

    name: str
    fractured: bool | None
    genant_grade: GenantGrade | None
    morphology: Morphology | None
    heights_mm: dict[str, float]
    height_loss_percent: float | None
    referenced_segment_number: int | None
    tracking_uid: str
    assessed: bool = True
    not_assessed: str | None = None
    numbering_note: str | None = None


def _texts(group) -> dict[str, str]:
    """TEXT children of a group's container, by concept code value."""
    return {item.ConceptNameCodeSequence[0].CodeValue: str(item.TextValue)
            for item in group[0].ContentSequence if item.ValueType == "TEXT"}


def read_vertebrae(dataset: "Dataset") -> list[ReportedVertebra]:
    """Read the per-vertebra groups of one of our SRs back with highdicom.

    The level comes from the Finding Site code (the generic vertebra code of T13/L6 falls back
    to the Tracking Identifier "T13 vertebra"). A vertebra's groups share its Tracking UID (its
    TID 1411 group, and its group on the key image, :mod:`pipeline.outputs.sr_key_image`): the
    one with the fracture evaluation names it, the heights are read from all of them.
    """
    from pipeline.levels import LEVELS

    by_code = {lv.sct_code: lv.name for lv in LEVELS if lv.sct_code}
    sr = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True)
    report = sr.content
    groups = [*report.get_volumetric_roi_measurement_groups(),
              *report.get_image_measurement_groups()]
    same_finding = sr_key_image.groups_by_tracking_uid(groups)
    topo = {codes.ANTERIOR.value: "anterior", codes.MIDDLE.value: "middle",
            codes.POSTERIOR.value: "posterior"}
    out = []
    for g in groups:
        site = g.finding_sites[0].value
        name = by_code.get(site.value) or str(g.tracking_identifier).removesuffix(" vertebra")
        evaluations = {(q.name.value, q.name.scheme_designator): q.value
                       for q in g.get_qualitative_evaluations()}
        if (codes.FRACTURE.value, "SCT") not in evaluations:
            continue  # not a vertebra group (the "no vertebra found" group)
        fracture = evaluations[(codes.FRACTURE.value, "SCT")]
        segment = None
        if isinstance(g, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
            segment = int(g.referenced_segment.referenced_segment_numbers[0])
        note = _texts(g).get(codes.LEVEL_NUMBERING_STATEMENT.value)
        if fracture.value in codes.NOT_ASSESSED_BY_CODE:
            out.append(ReportedVertebra(
                name=name, fractured=None, genant_grade=None, morphology=None, heights_mm={},
                height_loss_percent=None, referenced_segment_number=segment,
                tracking_uid=str(g.tracking_uid), assessed=False,
                not_assessed=codes.NOT_ASSESSED_BY_CODE[fracture.value], numbering_note=note))
            continue
        grade = evaluations[(codes.GENANT_GRADE.value, codes.PRIVATE_SCHEME)]
        morph = evaluations[(codes.FRACTURE_MORPHOLOGY.value, codes.PRIVATE_SCHEME)]
        heights: dict[str, float] = {}
        for m in (m for group in same_finding[str(g.tracking_uid)]
                  for m in group.get_measurements(name=codes.HEIGHT)):
            modifier = m.finding_sites[0].topographical_modifier
            if modifier is not None:
                heights[topo[modifier.value]] = float(m.value)
        losses = g.get_measurements(name=codes.HEIGHT_LOSS)
        out.append(ReportedVertebra(
            name=name,
            fractured=fracture.value == codes.PRESENT.value,
            genant_grade=codes.GRADE_BY_CODE[grade.value],
            morphology=codes.MORPHOLOGY_BY_CODE[morph.value],
            heights_mm=heights,
            height_loss_percent=float(losses[0].value) if losses else None,
            referenced_segment_number=segment,
            tracking_uid=str(g.tracking_uid),
            numbering_note=note,
        ))
    return out


@dataclass(frozen=True)
class ReportedNumbering:
    """The report-level statement on the level numbering (TID 1500 "Qualitative Evaluations")."""

    status: str
    statement: str


def read_numbering(dataset: "Dataset") -> ReportedNumbering | None:
    """The numbering our SR states at the report level (``None`` where it states none)."""
    root = dataset.ContentSequence
    for item in root:
        concept = item.ConceptNameCodeSequence[0]
        wanted = codes.QUALITATIVE_EVALUATIONS
        if (concept.CodeValue, concept.CodingSchemeDesignator) != (
                wanted.value, wanted.scheme_designator):
            continue
        status, statement = "", ""
        for child in item.ContentSequence:
            name = child.ConceptNameCodeSequence[0].CodeValue
            if child.ValueType == "CODE" and name == codes.LEVEL_NUMBERING.value:
                meaning = child.ConceptCodeSequence[0].CodeValue
                status = {c.value: s for s, c in codes.LEVEL_NUMBERING_CODES.items()}[meaning]
            elif child.ValueType == "TEXT" and name == codes.LEVEL_NUMBERING_STATEMENT.value:
                statement = str(child.TextValue)
        return ReportedNumbering(status=status, statement=statement)
    return None
