"""Coded concepts of the results (DESIGN.md, "Outputs", contract).

Standard codes come first (SNOMED CT "SCT", DICOM "DCM", LOINC "LN", UCUM); what no standard
code covers (the Genant grade and the fracture morphology as coded values, the height loss as a
measurement) comes from the project's one private coding scheme, :data:`PRIVATE_SCHEME`, which
every object that uses it declares in its Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2,
"Private Coding Scheme Designators" begin with ``99``).
"""
from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

from pipeline.findings import GenantGrade, Morphology
from pipeline.levels import VERTEBRA_SCT, Level

# --- SNOMED CT ---------------------------------------------------------------------------------
#: SEG Segmented Property Category of a normal vertebra (CID 7150).
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
#: SEG Segmented Property Category of a fractured vertebra (CID 7150).
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
#: Segmented Property Type of a fractured vertebra, and the concept of the fracture evaluation.
FRACTURE = Code("72704001", "SCT", "Fracture")
#: The generic vertebra (T13, L6: no level-specific code).
VERTEBRA = Code(VERTEBRA_SCT, "SCT", "Vertebra")
SPINE = Code("421060004", "SCT", "Spine")
#: Topographical modifiers of the three body heights (DESIGN.md: HA, HM, HP).
ANTERIOR = Code("255549009", "SCT", "Anterior")
MIDDLE = Code("26216008", "SCT", "Central")
POSTERIOR = Code("255551008", "SCT", "Posterior")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")

# --- DICOM -------------------------------------------------------------------------------------
#: Measurement name of a vertebral body height (with a topographical modifier).
HEIGHT = Code("121207", "DCM", "Height")
#: Observer Type of the device observer (CID 270) and the document title (CID 7021).
DEVICE_OBSERVER = Code("121007", "DCM", "Device")
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
#: Algorithm family of the segmentation and of the measurements (CID 7162).
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

# --- LOINC -------------------------------------------------------------------------------------
#: Procedure reported in TID 1500 (CID 100): the source CT.
CT_PROCEDURE = Code("25045-6", "LN", "CT unspecified body region")

# --- UCUM --------------------------------------------------------------------------------------
MILLIMETER = Code("mm", "UCUM", "millimeter")
PERCENT = Code("%", "UCUM", "Percent")
NO_UNITS = Code("1", "UCUM", "no units")

# --- The project's private coding scheme -------------------------------------------------------
PRIVATE_SCHEME = "99SPINENODE"
PRIVATE_SCHEME_NAME = "spine-node vertebral fracture codes"
PRIVATE_SCHEME_ORGANIZATION = "spine-node project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


#: Measurement: Genant height loss, 1 - min(HA, HM, HP) / max(HA, HM, HP), in percent.
HEIGHT_LOSS = _private("SPN-0001", "Vertebral body height loss")
#: Qualitative evaluation names.
GENANT_GRADE = _private("SPN-0002", "Genant semiquantitative grade")
FRACTURE_MORPHOLOGY = _private("SPN-0003", "Vertebral fracture morphology")
#: Measurement of a report that found no vertebra: how many it found (0), on the key image.
VERTEBRAE_FOUND = _private("SPN-0020", "Number of vertebrae found")

#: Coded values of :data:`GENANT_GRADE` (Genant 1993: grade 0 < 20 %, 1 = 20-25 %,
#: 2 = 25-40 %, 3 > 40 % height loss).
GENANT_GRADE_CODES: dict[GenantGrade, Code] = {
    GenantGrade.NORMAL: _private("SPN-G0", "Genant grade 0 (normal)"),
    GenantGrade.MILD: _private("SPN-G1", "Genant grade 1 (mild)"),
    GenantGrade.MODERATE: _private("SPN-G2", "Genant grade 2 (moderate)"),
    GenantGrade.SEVERE: _private("SPN-G3", "Genant grade 3 (severe)"),
}
#: Coded values of :data:`FRACTURE_MORPHOLOGY`.
MORPHOLOGY_CODES: dict[Morphology, Code] = {
    Morphology.NORMAL: _private("SPN-M0", "No deformity"),
    Morphology.WEDGE: _private("SPN-M1", "Wedge deformity"),
    Morphology.BICONCAVE: _private("SPN-M2", "Biconcave deformity"),
    Morphology.CRUSH: _private("SPN-M3", "Crush deformity"),
}
#: Value of the :data:`FRACTURE` evaluation of a vertebra that was not assessed, by the reason
#: (:attr:`pipeline.findings.VertebraFinding.not_assessed_reason`): it states no finding.
NOT_ASSESSED_CODES: dict[str, Code] = {
    "cut by the field of view": _private("SPN-NA1", "Not assessed: cut by the field of view"),
    "no vertebral body to grade": _private("SPN-NA2", "Not assessed: no vertebral body to grade"),
    "heights not measurable": _private("SPN-NA3", "Not assessed: heights not measurable"),
}
#: TID 1500 row "Qualitative Evaluations" (report level) and what it says about the numbering of
#: the levels (:mod:`pipeline.anchors`): a coded status and the statement as text.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
LEVEL_NUMBERING = _private("SPN-0004", "Vertebral level numbering")
LEVEL_NUMBERING_CODES: dict[str, Code] = {
    "anchored": _private("SPN-N1", "Anchored on anatomical landmarks"),
    "uncertain": _private("SPN-N2", "Uncertain"),
}
LEVEL_NUMBERING_STATEMENT = _private("SPN-0005", "Vertebral level numbering statement")
#: Also there (:mod:`pipeline.outputs.study_context`): the part of a multi-part study this
#: report covers, and the earlier result it replaces, each as a TEXT statement.
STUDY_PART_STATEMENT = _private("SPN-0006", "Part of a multi-part study")
REPLACES_STATEMENT = _private("SPN-0007", "Replaces an earlier result")

#: Reverse look-ups, for reading our own SR back.
GRADE_BY_CODE: dict[str, GenantGrade] = {c.value: g for g, c in GENANT_GRADE_CODES.items()}
MORPHOLOGY_BY_CODE: dict[str, Morphology] = {c.value: m for m, c in MORPHOLOGY_CODES.items()}
NOT_ASSESSED_BY_CODE: dict[str, str] = {c.value: r for r, c in NOT_ASSESSED_CODES.items()}


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item that declares :data:`PRIVATE_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=PRIVATE_SCHEME_ORGANIZATION,
    )


def vertebra_code(lv: Level) -> Code:
    """SNOMED CT code of a vertebra level ("L1 vertebra"); the generic vertebra for T13 and L6."""
    if lv.sct_code is None:
        return VERTEBRA
    return Code(lv.sct_code, "SCT", f"{lv.name} vertebra")


def as_concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)
