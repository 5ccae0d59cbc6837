"""Vertebral compression fractures of the phantom: which vertebrae, which grade, which shape.

The deformation of a fractured body is solved so that the heights measured at its Genant
keypoints give the requested grade under the rule in :mod:`pipeline.phantom.gt` (the same rule a
test recomputes from gt.json): grade 1 = 20-25 %, 2 = 25-40 %, 3 > 40 % height loss; wedge
(anterior), biconcave (middle), crush (whole body, judged against the neighbouring normal
vertebrae).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.findings import GenantGrade, Morphology
from pipeline.levels import level
from pipeline.phantom.anatomy import Deformation, Fracture, VertebraSpec
from pipeline.phantom.gt import genant_from_heights

#: Height loss drawn for each grade, kept away from the class borders so rounding never moves it.
LOSS_RANGE = {1: (0.21, 0.24), 2: (0.27, 0.38), 3: (0.43, 0.55)}
MORPHOLOGIES = ("wedge", "biconcave", "crush")


@dataclass(frozen=True)
class FractureRequest:
    name: str
    grade: int
    morphology: str


def parse_fractures(spec: str | None) -> str | list[FractureRequest]:
    """``"auto"``, ``"none"`` (-> ``[]``) or ``"L1:2:wedge,T12:1:biconcave"``.

    Raises ``ValueError`` naming the bad item.
    """
    if spec is None:
        return "auto"
    s = spec.strip().lower()
    if s == "auto":
        return "auto"
    if s in ("none", ""):
        return []
    out = []
    for item in spec.split(","):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError(f"fracture {item!r}: expected LEVEL:GRADE[:MORPHOLOGY], e.g. L1:2:wedge")
        try:
            lv = level(parts[0])
        except KeyError:
            raise ValueError(f"fracture {item!r}: unknown level {parts[0]!r}") from None
        try:
            grade = int(parts[1])
        except ValueError:
            raise ValueError(f"fracture {item!r}: grade must be 1, 2 or 3") from None
        if grade not in (1, 2, 3):
            raise ValueError(f"fracture {item!r}: grade must be 1, 2 or 3")
        morph = parts[2].lower() if len(parts) == 3 else "wedge"
        if morph not in MORPHOLOGIES:
            raise ValueError(f"fracture {item!r}: morphology must be one of {', '.join(MORPHOLOGIES)}")
        if lv.name in ("C1", "C2"):
            raise ValueError(f"fracture {item!r}: C1 and C2 have no body to grade")
        out.append(FractureRequest(lv.name, grade, morph))
    return out


def choose_auto(rng: np.random.Generator, candidates: list[str]) -> list[FractureRequest]:
    """0-3 fractures among ``candidates`` (thoracolumbar levels more likely, as in osteoporosis)."""
    n = int(rng.choice([0, 1, 2, 3], p=[0.3, 0.35, 0.2, 0.15]))
    cands = [c for c in candidates if c not in ("C1", "C2")]
    n = min(n, len(cands))
    if n == 0:
        return []
    w = np.array([3.0 if c[0] in "TL" and c not in ("T1", "T2", "T3") else 1.0 for c in cands])
    picked = rng.choice(len(cands), size=n, replace=False, p=w / w.sum())
    out = []
    for k in sorted(picked):
        grade = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
        morph = str(rng.choice(MORPHOLOGIES, p=[0.5, 0.3, 0.2]))
        out.append(FractureRequest(cands[k], grade, morph))
    return out


def apply_fracture(v: VertebraSpec, req: FractureRequest, reference: float | None,
                   rng: np.random.Generator, cement_p: float = 0.15) -> None:
    """Deform ``v`` so that its keypoint heights give ``req`` (grade and morphology)."""
    lo, hi = LOSS_RANGE[req.grade]
    target = float(rng.uniform(lo, hi))
    kind = req.morphology
    if kind == "crush" and reference is None:
        reference = max(v.heights().values())  # no neighbour to compare with: its own normal size
    hw, hd = v.width / 2.0, v.depth / 2.0
    bumps = []
    for _ in range(int(rng.integers(2, 5))):
        which = 1 if (kind == "wedge" or rng.random() < 0.5) else -1
        bumps.append((float(rng.uniform(-0.5, 0.5) * hw), float(rng.uniform(-0.5, 0.5) * hd),
                      float(rng.uniform(2.5, 5.0)), float(rng.uniform(0.3, 0.9)), which))
    v.fracture = Fracture(grade=req.grade, morphology=kind, target_loss=target,
                          deformation=Deformation(kind=kind, amplitude=0.0, bumps=tuple(bumps)),
                          sclerotic_hu=float(rng.uniform(150, 400)),
                          cement=bool(rng.random() < cement_p))

    def loss(amp: float) -> float:
        v.fracture.deformation.amplitude = amp
        return genant_from_heights(v.heights(), reference)[0]

    def solve() -> None:
        """Bisect the deformation amplitude to the target height loss (loss grows with it)."""
        a, b = 0.0, 0.8 * v.height
        for _ in range(60):
            m = 0.5 * (a + b)
            if loss(m) < target:
                a = m
            else:
                b = m
        loss(0.5 * (a + b))

    solve()
    got = genant_from_heights(v.heights(), reference)
    if got[1] != GenantGrade(req.grade) or got[2] != Morphology(kind):
        # bumps placed unluckily on a keypoint: drop them and solve again
        if bumps:
            v.fracture.deformation.bumps = ()
            solve()
