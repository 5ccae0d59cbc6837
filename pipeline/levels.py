"""Vertebra levels: VerSe label numbers, names and SNOMED CT codes (DESIGN.md).

VerSe labels: 1-7 = C1-C7, 8-19 = T1-T12, 20-24 = L1-L5, 25 = L6, 28 = T13.
Anatomical order (cranial to caudal) puts T13 between T12 and L1 and L6 after L5.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    """One vertebra level.

    Attributes:
        label: VerSe label number.
        name: level name as a radiologist writes it (``"L1"``).
        order: position in cranio-caudal order (0 = C1).
        sct_code: SNOMED CT code of the vertebra, or ``None`` (T13, L6: no dedicated code;
            reported with the generic "vertebra" code 51282000).
    """

    label: int
    name: str
    order: int
    sct_code: str | None

    @property
    def region(self) -> str:
        return self.name[0]


_SCT = {
    "C1": "14806007", "C2": "39976000", "C3": "113205007", "C4": "5329002", "C5": "36978003",
    "C6": "36054005", "C7": "87391001", "T1": "64864005", "T2": "53733008", "T3": "1626008",
    "T4": "73071006", "T5": "56401006", "T6": "45296009", "T7": "62487009", "T8": "11068009",
    "T9": "82687006", "T10": "7610001", "T11": "12989004", "T12": "23215003", "L1": "66794005",
    "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003",
}
VERTEBRA_SCT = "51282000"

_ORDERED = (
    [(i, f"C{i}") for i in range(1, 8)]
    + [(7 + i, f"T{i}") for i in range(1, 13)]
    + [(28, "T13")]
    + [(19 + i, f"L{i}") for i in range(1, 6)]
    + [(25, "L6")]
)

LEVELS: tuple[Level, ...] = tuple(
    Level(label=lab, name=name, order=k, sct_code=_SCT.get(name)) for k, (lab, name) in enumerate(_ORDERED)
)
BY_LABEL: dict[int, Level] = {lv.label: lv for lv in LEVELS}
BY_NAME: dict[str, Level] = {lv.name: lv for lv in LEVELS}
#: Number of heatmap channels of the localization network: one per level, in anatomical order.
N_LEVELS = len(LEVELS)


def level(key: int | str) -> Level:
    """Look a level up by VerSe label number or name; raises ``KeyError`` with the bad key."""
    if isinstance(key, str):
        return BY_NAME[key.upper()]
    return BY_LABEL[int(key)]


def level_range(spec: str) -> list[Level]:
    """Levels of a range such as ``"T8-L5"`` (inclusive, anatomical order)."""
    first, _, last = spec.partition("-")
    a = level(first.strip())
    b = level((last or first).strip())
    if a.order > b.order:
        raise ValueError(f"level range {spec!r} runs caudal to cranial")
    return [lv for lv in LEVELS if a.order <= lv.order <= b.order]
