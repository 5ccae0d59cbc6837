"""Where one result stands in its study (issue 27, DESIGN.md "Data flow"): which part of the
spine it covers when the study's eligible series cover several parts without overlap (each part
is analysed once, each result says that it covers one part), and which earlier result it
replaces (a new version of the same series, or a better series of the same part that arrived
later). summary.json carries :meth:`StudyContext.summary`; the SR the statements as TEXT in the
report's TID 1500 "Qualitative Evaluations" and the replaced SR in its Predecessor Documents
Sequence (PS3.3 C.17.2, SR Document General Module).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom import Dataset


@dataclass(frozen=True)
class ReplacedResult:
    """An earlier result of the study that this one replaces: its source series and version,
    and the header of its SR (for the Predecessor Documents Sequence), where it has one."""

    series_instance_uid: str
    version: int
    sr: "Dataset | None" = None

    @property
    def sr_sop_instance_uid(self) -> str | None:
        return str(self.sr.SOPInstanceUID) if self.sr is not None else None


@dataclass(frozen=True)
class StudyContext:
    """``series_instance_uid``: the analysed series; ``z_range_mm``: the patient z it covers
    (low, high); ``other_parts``: the study's other analysed series (each covering another part
    of the spine, reported separately); ``replaces``: the earlier results this one replaces."""

    series_instance_uid: str
    z_range_mm: tuple[float, float] | None = None
    other_parts: tuple[str, ...] = ()
    replaces: tuple[ReplacedResult, ...] = field(default_factory=tuple)

    @property
    def multi_part(self) -> bool:
        return bool(self.other_parts)

    @property
    def says_anything(self) -> bool:
        return self.multi_part or bool(self.replaces)

    def part_statement(self) -> str | None:
        """``Covers part of a multi-part study: series A (z -310 to -150 mm); the study's
        other part (series B) is reported separately.``"""
        if not self.multi_part:
            return None
        where = f" (z {self.z_range_mm[0]:.0f} to {self.z_range_mm[1]:.0f} mm)" \
            if self.z_range_mm is not None else ""
        n = len(self.other_parts)
        others = ", ".join(self.other_parts)
        return (f"Covers part of a multi-part study: series {self.series_instance_uid}{where}; "
                f"the study's other {'part' if n == 1 else f'{n} parts'} (series {others}) "
                f"{'is' if n == 1 else 'are'} reported separately.")

    def replaces_statement(self) -> str | None:
        """``Replaces the result of series A version 1 (SR 1.2.3).``"""
        if not self.replaces:
            return None
        items = []
        for r in self.replaces:
            sr = f" (SR {r.sr_sop_instance_uid})" if r.sr_sop_instance_uid else ""
            items.append(f"series {r.series_instance_uid} version {r.version}{sr}")
        return f"Replaces the result of {'; '.join(items)}."

    def statements(self) -> list[str]:
        return [s for s in (self.part_statement(), self.replaces_statement()) if s]

    def predecessors(self) -> Sequence["Dataset"]:
        return [r.sr for r in self.replaces if r.sr is not None]

    def summary(self) -> dict[str, Any]:
        """summary.json's ``study`` object."""
        out: dict[str, Any] = {"multi_part": self.multi_part}
        if self.multi_part:
            out["part"] = {"series_instance_uid": self.series_instance_uid,
                           "z_range_mm": [round(float(v), 1) for v in self.z_range_mm]
                           if self.z_range_mm is not None else None,
                           "other_parts": list(self.other_parts),
                           "statement": self.part_statement()}
        if self.replaces:
            out["replaces"] = [{"series_instance_uid": r.series_instance_uid,
                                "version": r.version,
                                "sr_sop_instance_uid": r.sr_sop_instance_uid}
                               for r in self.replaces]
            out["replaces_statement"] = self.replaces_statement()
        return out
