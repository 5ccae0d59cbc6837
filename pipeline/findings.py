"""Typed findings of the analysis: what the SEG, the SR and summary.json carry.

Genant semi-quantitative grading (DESIGN.md "Pipeline" step 4; paper section 2.3.3, eq. 17-18):
height loss = 1 - min(HA, HM, HP) / max(HA, HM, HP); grade 0 < 20 %, 1 = 20-25 %,
2 = 25-40 %, 3 > 40 %.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any


class GenantGrade(IntEnum):
    """Genant semi-quantitative grade."""

    NORMAL = 0
    MILD = 1
    MODERATE = 2
    SEVERE = 3

    @classmethod
    def from_height_loss(cls, loss: float) -> "GenantGrade":
        """Grade of a fractional height loss (0..1): <0.20 normal, <0.25 mild, <=0.40 moderate."""
        if loss < 0.20:
            return cls.NORMAL
        if loss < 0.25:
            return cls.MILD
        if loss <= 0.40:
            return cls.MODERATE
        return cls.SEVERE


class Morphology(str, Enum):
    """Fracture morphology: which height is reduced (Genant)."""

    NORMAL = "normal"
    WEDGE = "wedge"          # anterior height reduced
    BICONCAVE = "biconcave"  # middle height reduced
    CRUSH = "crush"          # whole body reduced (against neighbouring normal vertebrae)


#: Names of the six Genant keypoints on the mid-sagittal plane: superior (1) and inferior (2)
#: endplate points at the anterior (A), middle (M) and posterior (P) part of the body.
KEYPOINT_NAMES = ("A1", "A2", "M1", "M2", "P1", "P2")


@dataclass(frozen=True)
class Heights:
    """Anterior, middle and posterior vertebral body heights in mm (HA, HM, HP)."""

    anterior: float
    middle: float
    posterior: float

    @property
    def largest(self) -> float:
        return max(self.anterior, self.middle, self.posterior)

    def as_dict(self) -> dict[str, float]:
        return {"anterior": round(self.anterior, 2), "middle": round(self.middle, 2),
                "posterior": round(self.posterior, 2)}


@dataclass
class VertebraFinding:
    """Everything the node reports about one vertebra.

    ``centroid_mm`` is in patient LPS millimetres, as in DICOM.
    """

    label: int
    name: str
    centroid_mm: tuple[float, float, float]
    fractured: bool = False
    genant_grade: GenantGrade = GenantGrade.NORMAL
    morphology: Morphology = Morphology.NORMAL
    heights_mm: Heights | None = None
    height_loss: float | None = None
    partial: bool = False
    keypoints_mm: dict[str, tuple[float, float, float]] | None = None
    mask_heights_mm: Heights | None = None
    grading_source: str = "keypoints"   # "keypoints" | "mask" | "none" (not graded: C1, C2)
    notes: list[str] = field(default_factory=list)

    @property
    def assessed(self) -> bool:
        """Whether the grade rests on measured heights: not for a vertebra cut by the field of
        view (``partial``) nor for one the grading left out (``grading_source == "none"``: C1,
        C2, no usable heights). An unassessed vertebra keeps grade 0 in summary.json (contract)
        but the SR and the key image report it as not assessed."""
        return not self.partial and self.grading_source != "none"

    @property
    def not_assessed_reason(self) -> str | None:
        """Why the vertebra was not assessed (``None`` when it was)."""
        if self.partial:
            return "cut by the field of view"
        if self.grading_source == "none":
            if self.name in ("C1", "C2"):
                return "no vertebral body to grade"
            return "heights not measurable"
        return None

    def summary(self) -> dict[str, Any]:
        """The per-vertebra object of summary.json (DESIGN.md, contract)."""
        return {
            "name": self.name,
            "label": self.label,
            "centroid_mm": [round(float(c), 2) for c in self.centroid_mm],
            "fractured": bool(self.fractured),
            "genant_grade": int(self.genant_grade),
            "morphology": self.morphology.value,
            "heights_mm": self.heights_mm.as_dict() if self.heights_mm else None,
            "height_loss": None if self.height_loss is None else round(float(self.height_loss), 4),
            "partial": self.partial,
            "grading_source": self.grading_source,
            "notes": list(self.notes),
        }
