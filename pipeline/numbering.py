"""Vertebral level numbering from anatomical anchors: the typed results and the decision.

:mod:`pipeline.anchors` measures the landmarks on the CT (the rib test of every vertebra, the
sacrum below the lowest, the skull base above the highest); :func:`decide` turns them into names:

- the last rib-bearing vertebra directly above a rib-free one is T12. With 11 or 13 rib pairs
  it would be T11 or T13; telling needs a count from the first rib, whose short arc the rib test
  cannot tell from a long transverse process (it misses the phantom's T1-T2 ribs), so the pairs
  are not counted and the last rib is always named T12: a spine with 11 or 13 pairs is named one
  level off where the ribs alone anchor it;
- the vertebra above the sacrum is L5; it is L6 where six rib-free vertebrae lie between the last
  rib and the sacrum (the count demands it; the reason adds that 11 rib pairs and five lumbar
  vertebrae would look the same), or where the localizer named it L6 and no rib says otherwise;
- the vertebra right below the skull base is C1 (or C2 a little further down).

Every anchor fixes one detected vertebra; the chain is renamed by counting bodies along it from
there (:func:`apply_numbering`), keeping VerSe labels. Anything ambiguous (a rib on one side only,
a transition not seen directly, anchors that disagree, a count of 4 or 7 lumbar vertebrae) makes
the numbering ``"uncertain"``, with the reason, and renames nothing. Spinal segment variants and
their numbering: Carrino et al., Radiology 2011;259:196-202.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.levels import BY_LABEL, BY_NAME, LEVELS

#: The highest vertebra is C1 when the skull base lies at most this far above its centroid
#: (:func:`pipeline.anchors.skull_above`), C2 up to :data:`SKULL_C2_GAP_MM`.
SKULL_C1_GAP_MM = 15.0
SKULL_C2_GAP_MM = 30.0
#: Consecutive detections further apart than this many local steps may have a vertebra between
#: them: no count across such a gap.
GAP_STEPS = 1.5
#: Typical distance between neighbouring centroids by region (mm), where a chain has one member.
TYPICAL_STEP_MM = {"C": 16.0, "T": 24.0, "L": 34.0}

_OPTIONAL = ("T13", "L6")
_STANDARD = tuple(lv.name for lv in LEVELS if lv.name not in _OPTIONAL)


class DetectedVertebra(Protocol):
    """What the anchors need of a detected vertebra (:class:`LocalizedVertebra` has it)."""

    label: int
    centroid_mm: Sequence[float]


#: One side of the rib test: a rib; none (the side is in view); not visible (out of the field of
#: view); unclear (a long bone too thick for a rib: an ilium, or a rib touching other bone).
RibSide = Literal["rib", "none", "not visible", "unclear"]


@dataclass(frozen=True)
class RibEvidence:
    """The rib test of one vertebra: per side, and what the pair says (``R`` rib-bearing,
    ``F`` rib-free, ``A`` ambiguous: a rib on one side and none on the other, ``?`` a side not
    visible or unclear: no evidence either way)."""

    name: str
    right: RibSide
    left: RibSide
    reach_mm: tuple[float, float] = (0.0, 0.0)

    @property
    def kind(self) -> str:
        sides = {self.right, self.left}
        if sides == {"rib"}:
            return "R"
        if sides == {"rib", "none"}:
            return "A"
        if sides == {"none"}:
            return "F"
        return "?"


@dataclass(frozen=True)
class Anchor:
    """One landmark that fixes a level: which detected vertebra, and what it is."""

    kind: Literal["last_rib", "sacrum", "skull_base"]
    detected_name: str
    anatomical_name: str
    detail: str

    @property
    def sentence(self) -> str:
        """``the vertebra above the sacrum (...) is L5 (localizer: L4)``."""
        said = "" if self.detected_name == self.anatomical_name else \
            f" (localizer: {self.detected_name})"
        return f"{self.detail} is {self.anatomical_name}{said}"

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "detected_name": self.detected_name,
                "anatomical_name": self.anatomical_name, "detail": self.detail}


@dataclass(frozen=True)
class Numbering:
    """How far the level names rest on anatomy.

    Attributes:
        status: ``"anchored"`` (at least one anchor, none ambiguous or contradicted) or
            ``"uncertain"``.
        reason: human-readable: what fixed the levels, or why nothing did (:attr:`statement`
            puts it in a sentence).
        anchors: the landmarks found.
        shift: levels by which the anchors move the localizer's names (``-4``: L4 -> T12);
            0 when they agree or when the numbering is uncertain.
        names: the anchored name of every detected vertebra, cranial to caudal (the
            localizer's names when nothing is shifted).
        applied: the names were changed in the analysis (``False`` where the caller supplied
            the labels or the numbering is uncertain).
        ribs: the rib test of every vertebra, cranial to caudal.
    """

    status: Literal["anchored", "uncertain"]
    reason: str
    anchors: tuple[Anchor, ...] = ()
    shift: int = 0
    names: tuple[str, ...] = ()
    applied: bool = False
    ribs: tuple[RibEvidence, ...] = field(default=(), repr=False)

    @property
    def uncertain(self) -> bool:
        return self.status != "anchored"

    @property
    def statement(self) -> str:
        """The sentence the SR and the key image carry."""
        return f"Vertebral level numbering {self.status}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        """The ``numbering`` object of summary.json."""
        return {"status": self.status, "reason": self.reason,
                "anchors": [a.as_dict() for a in self.anchors], "shift": int(self.shift),
                "applied": bool(self.applied)}


# ------------------------------------------------------------------------------------------
# from anchors to names
# ------------------------------------------------------------------------------------------
def sequence(thoracic: int = 12, lumbar: int = 5) -> tuple[str, ...]:
    """Level names cranial to caudal for a spine of ``thoracic`` (11-13) rib-bearing and
    ``lumbar`` (5-6) lumbar vertebrae."""
    return (tuple(f"C{i}" for i in range(1, 8)) + tuple(f"T{i}" for i in range(1, thoracic + 1))
            + tuple(f"L{i}" for i in range(1, lumbar + 1)))


def position(name: str) -> int:
    """Place of a level in the standard 24-level spine, T13 counted as L1 and L6 after L5: the
    unit of :attr:`Numbering.shift`."""
    special = {"T13": _STANDARD.index("L1"), "L6": len(_STANDARD)}
    return special[name] if name in special else _STANDARD.index(name)


def _ranks(names: Sequence[str]) -> list[int]:
    """Vertebral bodies from the first detection, by the localizer's names (a skipped level is a
    body; the optional T13 and L6 only where named)."""
    orders = [BY_NAME[n].order for n in names]
    out = [0]
    for a, b in zip(orders, orders[1:]):
        # as the localizer's chain counts them (inference._min_gap): T13/L6 only where named
        bodies = sum(1 for k in range(a + 1, b + 1) if LEVELS[k].name not in _OPTIONAL)
        out.append(out[-1] + max(1, bodies))
    return out


def steps(names: Sequence[str], cents: Sequence[np.ndarray]) -> tuple[list[float], list[bool]]:
    """Per vertebra its local step (mean distance to its chain neighbours), and per consecutive
    pair whether it is close enough for no vertebra to hide between (:data:`GAP_STEPS`)."""
    d = [float(np.linalg.norm(b - a)) for a, b in zip(cents, cents[1:])]
    local = []
    for i, n in enumerate(names):
        near = [d[j] for j in (i - 1, i) if 0 <= j < len(d)]
        local.append(float(np.mean(near)) if near else TYPICAL_STEP_MM[BY_NAME[n].region])
    close = []
    for i, di in enumerate(d):
        ref = [d[j] for j in range(max(0, i - 2), min(len(d), i + 3)) if j != i]
        typical = float(np.median(ref)) if ref else TYPICAL_STEP_MM[BY_NAME[names[i + 1]].region]
        close.append(di <= GAP_STEPS * typical)
    return local, close


def _rib_pattern(ribs: Sequence[RibEvidence], close: Sequence[bool]
                 ) -> tuple[int | None, list[str]]:
    """(index of the last rib-bearing vertebra directly above a rib-free one, problems).

    Read cranial to caudal (``?``, not assessable, skipped): rib-free cervical vertebrae, then
    perhaps one-sided upper ribs (the first ribs are short), the run of rib-bearing vertebrae
    (a one-sided rib inside it counts as rib-bearing), then rib-free lumbar ones. A one-sided rib
    below the run, a rib-bearing vertebra below a rib-free one inside the run, or a transition
    not seen between two adjacent detections leaves the last rib unanchored, as a problem.
    """
    kinds = [r.kind for r in ribs]
    seen = [i for i, k in enumerate(kinds) if k != "?"]
    for a, i, b in zip(seen, seen[1:], seen[2:]):
        if kinds[i] == "A" and kinds[a] == "R" and kinds[b] == "R":
            kinds[i] = "R"
    bearing = [i for i in seen if kinds[i] == "R"]
    if not bearing:
        return None, []
    first, last = bearing[0], bearing[-1]
    problems = [f"a rib-free vertebra ({ribs[i].name}) between rib-bearing ones"
                for i in seen if first < i < last and kinds[i] != "R"]
    below = [i for i in seen if i > last]
    problems += [f"a rib on one side only at the vertebra the localizer named {ribs[i].name}"
                 for i in below if kinds[i] == "A"]
    if problems or not below:
        return None, problems
    nxt = below[0]
    if nxt != last + 1 or not close[last]:
        return None, [f"the rib transition between {ribs[last].name} and {ribs[nxt].name} is "
                      f"not seen directly (a vertebra between them was not assessed or not found)"]
    return last, []


def decide(names: Sequence[str], cents: Sequence[Sequence[float]], ribs: Sequence[RibEvidence],
           sacrum: tuple[str, str], skull: tuple[str, float | None] | None) -> Numbering:
    """The numbering from the measurements (no image here: unit-testable).

    ``names`` are the localizer's, cranial to caudal; ``sacrum`` is ``(state, detail)`` with
    state ``"sacrum"``, ``"none"``, ``"not visible"`` or ``"contradicted"`` (the sacrum test and
    the junction classifier disagree: :func:`pipeline.anchors.find_numbering`); ``skull`` is
    ``None`` where the highest vertebra is not cervical (the skull base is not looked for).
    """
    cents_ = [np.asarray(c, dtype=float) for c in cents]
    ranks = _ranks(names)
    _local, close = steps(names, cents_)
    last, problems = _rib_pattern(ribs, close)
    low, top = len(names) - 1, 0
    thoracic, lumbar = 12, 5       # no T11/T13: counting rib pairs needs the first rib (see top)
    found: list[tuple[Anchor, int]] = []
    if last is not None:
        found.append((Anchor("last_rib", names[last], f"T{thoracic}",
                             "the last rib-bearing vertebra (ribs on both sides, none on the "
                             "next one)"), last))
    state, detail = sacrum
    if state == "sacrum":
        if last is not None and all(close[last:low]):
            count = ranks[low] - ranks[last]
            if count in (5, 6):
                lumbar = count
                if count == 6:
                    detail += ("; six rib-free vertebrae above it: L1-L6, or a rib-free T12 "
                               "with 11 rib pairs")
            else:
                problems.append(f"{count} rib-free vertebrae between the last rib-bearing "
                                f"vertebra and the sacrum (transitional anatomy): levels not "
                                f"fixed")
        elif names[low] == "L6":
            lumbar = 6
        target = f"L{lumbar}"
        found.append((Anchor("sacrum", names[low], target,
                             f"the vertebra above the sacrum ({detail})"), low))
    if skull is not None and skull[0] == "skull":
        gap = float(skull[1] or 0.0)
        if gap <= SKULL_C1_GAP_MM:
            target = "C1"
        elif gap <= SKULL_C2_GAP_MM:
            target = "C1" if names[top] == "C1" else "C2"
        else:
            target = ""
            problems.append(f"skull base {gap:.0f} mm above the highest vertebra: C1 and C2 "
                            f"not both found")
        if target:
            found.append((Anchor("skull_base", names[top], target,
                                 f"the vertebra {gap:.0f} mm below the skull base"), top))
    ribs_t = tuple(ribs)
    if problems or not found:
        reason = "; ".join(problems + ([] if found else _missing(names, ribs, sacrum, skull)))
        return Numbering("uncertain", reason,
                         tuple(a for a, _ in found), 0, tuple(names), False, ribs_t)
    seq = sequence(thoracic, lumbar)
    offsets = {seq.index(a.anatomical_name) - ranks[i] for a, i in found}
    if len(offsets) > 1:
        said = ", ".join(f"{a.detected_name} is {a.anatomical_name}" for a, _ in found)
        return Numbering("uncertain", f"the anchors disagree ({said})",
                         tuple(a for a, _ in found), 0, tuple(names), False, ribs_t)
    (offset,) = offsets
    idx = [offset + r for r in ranks]
    if min(idx) < 0 or max(idx) >= len(seq):
        return Numbering("uncertain", "the anchored names run beyond the spine",
                         tuple(a for a, _ in found), 0, tuple(names), False, ribs_t)
    new = tuple(seq[k] for k in idx)
    if all(a == b for a, b in zip(new, names)):
        shift = 0
    else:
        a0, i0 = found[0]
        shift = position(a0.anatomical_name) - position(names[i0])
    reason = "; ".join(a.sentence for a, _ in found)
    if new != tuple(names):
        reason += (f"; the localizer's names were moved by {shift:+d} level(s) "
                   f"({names[0]}-{names[-1]} -> {new[0]}-{new[-1]})")
    return Numbering("anchored", reason, tuple(a for a, _ in found), shift, new, False, ribs_t)


def _missing(names: Sequence[str], ribs: Sequence[RibEvidence], sacrum: tuple[str, str],
             skull: tuple[str, float | None] | None) -> list[str]:
    """Why no anchor was found, one phrase per kind of anchor."""
    kinds = {r.kind for r in ribs}
    if kinds <= {"?"}:
        rib = "ribs not assessable (field of view too narrow beside the spine)"
    elif kinds <= {"F", "?"}:
        rib = "no rib-bearing vertebra in the field of view"
    elif kinds <= {"R", "?"}:
        rib = "no rib-free vertebra next to the rib-bearing ones"
    else:
        rib = "no rib-bearing to rib-free transition"
    if sacrum[0] == "not visible":
        sac = "sacrum not assessable (field of view too narrow or too short below the lowest " \
              "vertebra)"
    elif sacrum[0] == "contradicted":
        sac = f"the sacrum tests disagree: {sacrum[1]}"
    else:
        sac = "no sacrum below the lowest vertebra"
    if skull is None:
        top = "the chain does not reach C2 or the skull base"
    elif skull[0] == "not visible":
        top = "skull base not assessable above the highest vertebra"
    else:
        top = "no skull base above the highest vertebra"
    return [rib, sac, top]


def apply_numbering(vertebrae: Sequence[DetectedVertebra], numbering: Numbering
                    ) -> tuple[list, Numbering]:
    """The vertebrae in anatomical order, renamed to ``numbering.names`` where the numbering is
    anchored and differs from their labels (VerSe labels of :mod:`pipeline.levels`); the
    numbering comes back with ``applied`` set when anything was renamed."""
    chain = sorted(vertebrae, key=lambda v: BY_LABEL[int(v.label)].order)
    names = [BY_LABEL[int(v.label)].name for v in chain]
    if numbering.uncertain or list(numbering.names) == names or \
            len(numbering.names) != len(chain):
        return chain, numbering
    return ([_renamed(v, BY_NAME[n].label, n) for v, n in zip(chain, numbering.names)],
            replace(numbering, applied=True))


def _renamed(v: DetectedVertebra, label: int, name: str):
    """A copy of ``v`` with a new label (and name, where it has one)."""
    if is_dataclass(v) and not isinstance(v, type):
        own = {f.name for f in fields(v)}
        return replace(v, label=label, **({"name": name} if "name" in own else {}))
    out = copy.copy(v)
    out.label = label
    if hasattr(out, "name"):
        out.name = name
    return out
