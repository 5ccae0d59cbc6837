"""What a real scan shows besides the labelled vertebrae, placed from the label map.

A network that sees vertebrae floating in uniform soft tissue learns that anything bright is a
vertebra. Real scans show the sacrum and iliac wings below the lumbar spine, ribs on every
thoracic level, the aorta and the vena cava in front of the spine (bright with contrast media),
lungs beside the thoracic spine, bowel gas, the skin and the table, sometimes metal, and in CT
myelography a dural sac as bright as bone inside the spinal canal. This module
decides, at random but anchored on the vertebrae's own frames, where these structures are; it
only describes them in patient millimetres (:mod:`pipeline.synthesis.raster` solids), so that
one description renders on the whole grid or on a crop of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from pipeline.levels import BY_LABEL
from pipeline.synthesis.geometry import (
    BODY_SUBREGIONS,
    VertebraFrame,
    label_boxes,
    label_centroids,
    level_sorted,
    vertebra_frame,
    voxel_points,
)
from pipeline.synthesis.raster import Solid, Tube, densify

THORACIC = tuple(range(8, 20)) + (28,)
LUMBAR = tuple(range(20, 26))
#: Levels from which a sacrum is drawn below (L5, L6).
LAST_LUMBAR = (24, 25)
#: Lowest level of the abdominal aorta (it divides at L4) and highest (the arch is at T4).
AORTA_LEVELS = ("T4", "L4")
IVC_LEVELS = ("T11", "L4")


@dataclass(frozen=True)
class SceneOptions:
    """Probabilities (per volume) of each structure."""

    sacrum: float = 0.9
    ilium: float = 0.8
    ribs: float = 0.9
    vessels: float = 0.9
    contrast: float = 0.5
    outline: float = 0.85
    table: float = 0.6
    lungs: float = 0.95
    gas: float = 0.6
    metal: float = 0.05
    #: Contrast in the dural sac (CT myelography, :func:`plan_theca`); at 0 no random number is
    #: drawn for it.
    myelography: float = 0.0


#: HU of the dural sac filled with iodinated contrast at CT myelography (as bright as cancellous
#: to cortical bone), and its radius (mm).
THECA_HU = (200.0, 1200.0)
THECA_RADIUS_MM = (5.0, 8.0)

@dataclass(frozen=True)
class VertebraInfo:
    """Where a vertebra and its body are (LPS mm).

    Attributes:
        frame: the vertebra's local frame.
        body_centre: centroid of its body.
        height, depth, width: extent of the body along up, anterior and left (5-95 %).
        tips: most lateral point of the posterior elements on each side (+1 left, -1 right):
            the transverse process tips, where ribs articulate.
        back: distance (mm) from the body centre to the most posterior voxel of the vertebra
            (the spinous process tip), behind which the skin lies.
    """

    frame: VertebraFrame
    body_centre: np.ndarray
    height: float
    depth: float
    width: float
    tips: dict[int, np.ndarray] = field(default_factory=dict)
    back: float = 0.0

    def point(self, t: float, a: float, w: float) -> np.ndarray:
        """LPS mm of local ``(t, a, w)`` relative to the body centre."""
        f = self.frame
        return self.body_centre + t * f.up + a * f.anterior + w * f.left


@dataclass
class Outline:
    """The patient's skin (an elliptic cylinder following the spine), fat under it, table."""

    offset_x: float
    posterior_mm: float
    half_x: float
    half_y: float
    fat_mm: float
    table_thickness: float | None
    table_gap: float
    table_hu: float


@dataclass
class Lungs:
    """Two elliptic lungs beside the thoracic spine between ``z_bottom`` and ``z_top``."""

    z_bottom: float
    z_top: float
    half_x: float
    half_y: float
    medial_mm: float
    offset_y: float
    hu: float


@dataclass
class Streaks:
    """Metal streak artefact in axial slices through ``centre`` over ``z_range``."""

    centre: np.ndarray
    z_range: tuple[float, float]
    angles: np.ndarray
    amplitudes: np.ndarray
    width_mm: float


@dataclass
class Scene:
    """Everything the renderer draws besides the labels (all LPS mm)."""

    spine: np.ndarray                       # [n, 3] body centres, cranial to caudal
    bone: list = field(default_factory=list)        # Solid | Tube, drawn with bone texture
    discs: list = field(default_factory=list)       # Solid: disc spaces not between labels
    sacrum: bool = False
    s1_centre: np.ndarray | None = None              # centre of the S1 body, where drawn
    ends: tuple[int, ...] = ()                       # first and last level of the whole spine
    vessels: list = field(default_factory=list)     # Tube
    metal: list = field(default_factory=list)       # Solid | Tube
    streaks: list = field(default_factory=list)     # Streaks
    outline: Outline | None = None
    lungs: Lungs | None = None
    gas: bool = False
    theca: Tube | None = None                       # contrast-filled dural sac (myelography)


def vertebra_infos(labels: sitk.Image, subregions: sitk.Image) -> dict[int, VertebraInfo]:
    """:class:`VertebraInfo` of every vertebra of a label map (subregions give the bodies)."""
    lab = sitk.GetArrayViewFromImage(labels)
    sub = sitk.GetArrayViewFromImage(subregions)
    cents = label_centroids(labels)
    boxes = label_boxes(np.asarray(lab))
    out = {}
    for label in level_sorted(cents):
        frame = vertebra_frame(cents, label)
        box = boxes[label]
        vert = lab[box] == label
        body = vert & np.isin(sub[box], BODY_SUBREGIONS)
        offs = [s.start for s in box]
        if body.sum() < 50:
            body = vert
        bz = np.nonzero(body)
        bpts = voxel_points(labels, tuple(i + o for i, o in zip(bz, offs)))
        t, a, w = frame.local(bpts)
        lo, hi = np.percentile(np.stack([t, a, w], 1), (5, 95), axis=0)
        centre = bpts.mean(axis=0)
        tips = {}
        vz = np.nonzero(vert)
        vpts = voxel_points(labels, tuple(i + o for i, o in zip(vz, offs)))
        back = float(np.max(-((vpts - centre) @ frame.anterior)))
        rest = vert & ~body
        if rest.sum() > 20:
            rz = np.nonzero(rest)
            rpts = voxel_points(labels, tuple(i + o for i, o in zip(rz, offs)))
            rw = frame.local(rpts)[2]
            for side in (1, -1):
                tips[side] = rpts[int(np.argmax(side * rw))]
        out[label] = VertebraInfo(frame, centre, float(hi[0] - lo[0]) / 0.9,
                                  float(hi[1] - lo[1]) / 0.9, float(hi[2] - lo[2]) / 0.9, tips,
                                  back)
    return out


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _rotate(v: np.ndarray, towards: np.ndarray, deg: float) -> np.ndarray:
    """``v`` turned by ``deg`` towards ``towards`` (both unit, orthogonal)."""
    r = np.deg2rad(deg)
    return np.cos(r) * v + np.sin(r) * towards


def _turn(v: np.ndarray, towards: np.ndarray, deg: float) -> np.ndarray:
    """Unit ``v`` turned by ``deg`` towards the part of ``towards`` orthogonal to it."""
    p = towards - (towards @ v) * v
    n = np.linalg.norm(p)
    if n < 1e-6:
        return v
    out = _rotate(v, p / n, deg)
    return out / np.linalg.norm(out)


def _basis(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Orthonormal columns: ``first``, ``second`` made orthogonal to it, their cross product."""
    a = first / np.linalg.norm(first)
    b = second - (second @ a) * a
    b /= np.linalg.norm(b)
    return np.stack([a, b, np.cross(a, b)], axis=1)


def plan_sacrum(v: VertebraInfo, rng: np.random.Generator, bone_hu: tuple[float, float],
                ilium: bool) -> tuple[list[Solid], Solid]:
    """Sacral segments S1-S4 (running down and back from a disc below the last lumbar body),
    alae beside S1 and, with ``ilium``, the iliac wings as plates beside them; and the
    lumbosacral disc (its HU a placeholder the renderer replaces)."""
    f = v.frame
    cort, canc = bone_hu
    back = -f.anterior
    direction = _rotate(-f.up, back, _u(rng, 20, 45))
    gap = _u(rng, 8, 14)
    disc = Solid(v.body_centre - f.up * (0.5 * v.height + 0.5 * gap), _basis(f.left, f.up),
                 np.array([0.48 * v.width, 0.5 * gap + 6.0, 0.48 * v.depth]), 3.0, 0.0)
    centre = v.body_centre - f.up * (0.5 * v.height + gap)
    h = _u(rng, 22, 28)
    half_w, half_d = 0.5 * v.width * _u(rng, 0.95, 1.15), 0.5 * v.depth * _u(rng, 0.85, 1.0)
    cortex = _u(rng, 1.0, 2.0)
    out: list[Solid] = []
    for k in range(4):
        centre = centre + direction * (0.5 * h)
        axes = _basis(f.left, direction)
        out.append(Solid(centre.copy(), axes, np.array([half_w, 0.5 * h, half_d]),
                         _u(rng, 2.5, 4.0), cort, canc, cortex))
        if k == 0:
            for side in (1, -1):
                ala_w = _u(rng, 18, 26)
                c = centre + side * f.left * (0.8 * half_w + ala_w)
                out.append(Solid(c, axes, np.array([ala_w, _u(rng, 16, 24), _u(rng, 14, 20)]),
                                 2.5, cort, canc, cortex))
                if ilium:
                    normal = _rotate(side * f.left, f.anterior, _u(rng, 20, 40))
                    c2 = (centre + side * f.left * (half_w + _u(rng, 55, 75))
                          + f.up * _u(rng, 20, 45) + f.anterior * _u(rng, -15, 5))
                    ax2 = _basis(normal, f.up)
                    out.append(Solid(c2, ax2, np.array([_u(rng, 4, 7), _u(rng, 45, 70),
                                                        _u(rng, 45, 70)]),
                                     2.0, cort, canc, 2.0))
        centre = centre + direction * (0.5 * h + 2.0)
        direction = _turn(direction, back, _u(rng, 4, 12))   # the sacrum curves backwards
        h, half_w, half_d = h * 0.85, half_w * 0.8, half_d * 0.85
    return out, disc


def plan_ribs(v: VertebraInfo, rng: np.random.Generator, bone_hu: tuple[float, float]
              ) -> list[Tube]:
    """A rib on each side of a thoracic vertebra: head at the back of the body, tubercle at the
    transverse process tip, then an arc running laterally-posteriorly and curving forwards and
    down (a stub of 80-180 mm, enough to cross any crop around the vertebra)."""
    f = v.frame
    cort, canc = bone_hu
    out = []
    for side, tip in v.tips.items():
        rel = tip - v.body_centre
        tt, ta, tw = rel @ f.up, rel @ f.anterior, rel @ f.left
        pts = [v.point(0.25 * v.height, -0.35 * v.depth, side * 0.5 * v.width),
               v.point(tt, ta + 3.0, tw)]
        phi, radius = np.deg2rad(_u(rng, 35, 60)), _u(rng, 55, 90)
        slope, length = _u(rng, 0.1, 0.35), _u(rng, 80, 180)
        t, a, w = tt, ta + 3.0, tw
        for _ in range(int(length / 2.0)):
            a += -np.cos(phi) * 2.0
            w += side * np.sin(phi) * 2.0
            t -= slope * 2.0
            phi = min(phi + 2.0 / radius, np.deg2rad(170))
            pts.append(v.point(t, a, w))
        r = _u(rng, 3.5, 5.5)
        out.append(Tube(densify(np.array(pts), 1.0), r, cort * _u(rng, 0.5, 0.9),
                        canc * _u(rng, 0.8, 1.2), min(_u(rng, 1.0, 1.5), r - 1.0)))
    return out


def _vessel(infos: dict[int, VertebraInfo], levels: tuple[str, str], side: float,
            rng: np.random.Generator, hu: float) -> Tube | None:
    """A vessel in front of the vertebral bodies between ``levels`` (inclusive), extended
    beyond the ends of the spine where the levels go on."""
    lo, hi = (BY_LABEL[lab].order for lab in (_label(levels[0]), _label(levels[1])))
    labs = [lab for lab in infos if lo <= BY_LABEL[lab].order <= hi]
    if len(labs) < 1:
        return None
    r = _u(rng, 8, 14)
    gap, lat = _u(rng, 1, 8), _u(rng, 5, 30) * side
    pts = [infos[lab].point(0.0, 0.5 * infos[lab].depth + r + gap, lat) for lab in labs]
    first, last = infos[labs[0]], infos[labs[-1]]
    if BY_LABEL[labs[0]].order > lo:
        pts.insert(0, pts[0] + first.frame.up * 80.0)
    if BY_LABEL[labs[-1]].order < hi:
        pts.append(pts[-1] - last.frame.up * 80.0)
    else:
        pts.append(pts[-1] - last.frame.up * 0.5 * last.height)
    if len(pts) < 2:
        return None
    return Tube(densify(np.array(pts), 1.0), r, hu)


def plan_theca(infos: dict[int, VertebraInfo], order: list[int], rng: np.random.Generator
               ) -> Tube:
    """The dural sac of a CT myelogram: a tube of contrast through the spinal canal, right
    behind each body's posterior wall, from above the highest vertebra to below the lowest (the
    sac ends at S2). Bone is painted over it, so only the canal and what the masks leave
    unlabelled show it."""
    r = _u(rng, *THECA_RADIUS_MM)
    pts = [infos[lab].point(0.0, -(0.5 * infos[lab].depth + r + _u(rng, 0.5, 2.5)), 0.0)
           for lab in order]
    pts.insert(0, pts[0] + infos[order[0]].frame.up * 30.0)
    pts.append(pts[-1] - infos[order[-1]].frame.up * 25.0)
    return Tube(densify(np.array(pts), 1.0), r, _u(rng, *THECA_HU))


def _label(name: str) -> int:
    from pipeline.levels import BY_NAME

    return BY_NAME[name].label


def plan_metal(infos: dict[int, VertebraInfo], rng: np.random.Generator
               ) -> tuple[list, list[Streaks]]:
    """Pedicle screws in one vertebra, or a small blob (a clip, a cement spot), > 3000 HU, with
    streaks in the axial slices through it."""
    labs = list(infos)
    v = infos[labs[int(rng.integers(len(labs)))]]
    hu = _u(rng, 3000, 8000)
    solids: list = []
    if rng.random() < 0.5:
        for side in (1, -1):
            entry = v.point(0.0, -0.5 * v.depth - 25.0, side * (0.5 * v.width - 2.0))
            end = v.point(0.0, 0.5 * v.depth - 8.0, side * 0.15 * v.width)
            solids.append(Tube(densify(np.array([entry, end]), 1.0), _u(rng, 2.5, 3.5), hu))
        centre = v.point(0.0, -0.2 * v.depth, 0.0)
    else:
        centre = v.point(_u(rng, -10, 10), _u(rng, -40, 30), _u(rng, -30, 30))
        solids.append(Solid(centre, np.eye(3), rng.uniform(2.0, 6.0, 3), 2.0, hu))
    n = int(rng.integers(4, 11))
    streaks = [Streaks(centre, (centre[2] - 8.0, centre[2] + 8.0), rng.uniform(0, np.pi, n),
                       rng.uniform(100, 600, n) * rng.choice([-1.0, 1.0], n), _u(rng, 1.0, 3.0))]
    return solids, streaks


def plan_scene(labels: sitk.Image, subregions: sitk.Image, rng: np.random.Generator,
               bone_hu: tuple[float, float], options: SceneOptions = SceneOptions()) -> Scene:
    """Draw the structures around the labelled spine (``bone_hu`` = the case's cortical and
    cancellous HU, which the extra bones share)."""
    infos = vertebra_infos(labels, subregions)
    order = level_sorted(infos)
    spine = np.array([infos[lab].body_centre for lab in order]) if order else np.zeros((0, 3))
    scene = Scene(spine)
    if not order:
        return scene
    scene.ends = (order[0], order[-1])
    if order[-1] in LAST_LUMBAR and rng.random() < options.sacrum:
        solids, disc = plan_sacrum(infos[order[-1]], rng, bone_hu, rng.random() < options.ilium)
        scene.bone += solids
        scene.discs.append(disc)
        scene.sacrum = True
        scene.s1_centre = solids[0].centre.copy()
    if rng.random() < options.ribs:
        for lab in order:
            if lab in THORACIC:
                scene.bone += plan_ribs(infos[lab], rng, bone_hu)
    if rng.random() < options.vessels:
        contrast = rng.random() < options.contrast
        hu_a = _u(rng, 150, 400) if contrast else _u(rng, 30, 60)
        hu_v = _u(rng, 60, 200) if contrast else hu_a + _u(rng, -5, 5)
        for tube in (_vessel(infos, AORTA_LEVELS, 1.0, rng, hu_a),
                     _vessel(infos, IVC_LEVELS, -1.0, rng, hu_v)):
            if tube is not None:
                scene.vessels.append(tube)
    if rng.random() < options.outline:
        table = rng.random() < options.table
        post = max(v.back for v in infos.values()) + _u(rng, 12, 60)   # skin behind the spine
        half_y = 0.5 * (post + _u(rng, 60, 200))                       # + abdomen/chest depth
        scene.outline = Outline(_u(rng, -15, 15), post, max(100.0, half_y * _u(rng, 1.1, 1.6)),
                                half_y, _u(rng, 5, 35), _u(rng, 5, 25) if table else None,
                                _u(rng, 0, 15), _u(rng, -300, 200))
    thoracic = [lab for lab in order if lab in THORACIC]
    if thoracic and rng.random() < options.lungs:
        z_low = infos[thoracic[-1]].body_centre[2]
        bottom = z_low + _u(rng, -25, 15) if thoracic[-1] in (19, 28) else z_low - 80.0
        top = infos[8].body_centre[2] + _u(rng, 10, 40) if 8 in infos else np.inf
        scene.lungs = Lungs(bottom, top, _u(rng, 40, 70), _u(rng, 50, 90), _u(rng, 22, 35),
                            _u(rng, -15, 25), _u(rng, -920, -750))
    scene.gas = any(lab in LUMBAR for lab in order) and rng.random() < options.gas
    if rng.random() < options.metal:
        scene.metal, scene.streaks = plan_metal(infos, rng)
    if options.myelography > 0 and rng.random() < options.myelography:
        scene.theca = plan_theca(infos, order, rng)
    return scene
