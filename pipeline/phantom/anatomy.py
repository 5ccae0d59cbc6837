"""Anatomy of the phantom in physical millimetres (patient LPS), before any voxel grid exists.

The spine is a chain of vertebrae placed along a smooth curve: cervical lordosis, thoracic
kyphosis, lumbar lordosis (sagittal), random scoliosis (coronal) and axial rotation. Each
vertebra has its own right-handed local frame ``(l, p, u)`` that mimics LPS: ``l`` towards the
patient's left, ``p`` posterior, ``u`` superior along the spine, so that ``l x p = u``.
Shapes are signed-distance-like functions in that frame (negative inside) that
:mod:`pipeline.phantom.render` evaluates on any grid, so the same seed gives the same anatomy
at 0.5 mm or at 2 mm.

Body sizes follow published morphometry closely enough for a model to learn the caudal growth
(cervical body height ~14 mm, width ~17 mm, depth ~16 mm; lumbar ~28 x 50 x 35 mm).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

from pipeline.levels import LEVELS, Level

# Keypoint positions on the mid-sagittal line of the body, as fractions of the half depth
# (p axis; negative = anterior). Genant measures at the anterior and posterior corners and the
# middle of the body (paper section 2.3.3).
KEYPOINT_P_FRACTION = {"A": -0.88, "M": 0.0, "P": 0.88}


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------
def superellipse_sdf(a: np.ndarray, b: np.ndarray, ra: float, rb: float, n: float = 2.0) -> np.ndarray:
    """Approximate signed distance to the superellipse ``|a/ra|^n + |b/rb|^n = 1`` (mm).

    Uses the degree-1 homogeneous norm ``s`` and ``(s - 1) / |grad s|``: exact on the boundary
    to first order, bounded everywhere (no blow-up at the centre).
    """
    xa = np.abs(a) / ra
    xb = np.abs(b) / rb
    if n == 2.0:
        s = np.sqrt(xa * xa + xb * xb)
        safe = np.maximum(s, 1e-6)
        ga = xa / (ra * safe)
        gb = xb / (rb * safe)
    else:
        qa = xa ** n
        qb = xb ** n
        q = qa + qb
        s = q ** (1.0 / n)
        safe = np.maximum(q, 1e-12) ** ((n - 1.0) / n)
        ga = (xa ** (n - 1.0)) / (ra * safe)
        gb = (xb ** (n - 1.0)) / (rb * safe)
    g = np.sqrt(ga * ga + gb * gb)
    return (s - 1.0) / np.maximum(g, 1.0 / np.maximum(ra, rb))


def oriented_box_sdf(l, p, u, center, axes, half) -> np.ndarray:
    """Approximate SDF of a box with centre ``center`` (local), unit ``axes`` (3x3 rows) and
    half sizes ``half``; inside it is exact, outside it is a lower bound (fine for occupancy)."""
    dl = l - center[0]
    dp = p - center[1]
    du = u - center[2]
    out = None
    for k in range(3):
        ax = axes[k]
        q = np.abs(dl * ax[0] + dp * ax[1] + du * ax[2]) - half[k]
        out = q if out is None else np.maximum(out, q)
    return out


def rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


# --------------------------------------------------------------------------------------------
# fractures (deformation of the endplates; the amplitude is solved in fractures.py)
# --------------------------------------------------------------------------------------------
@dataclass
class Deformation:
    """How a fracture moves the endplates (mm, positive = into the body).

    ``kind``: wedge (superior endplate tilts down anteriorly), biconcave (both endplates sink in
    the middle), crush (both endplates move in uniformly). ``amplitude``: mm at the keypoint where
    the deformation is largest. ``bumps``: irregularity of the broken endplates, as
    (l, p, radius, depth_mm, which) with which = +1 superior, -1 inferior.
    """

    kind: str
    amplitude: float = 0.0
    bumps: tuple = ()

    def offsets(self, l, p, half_w: float, half_d: float):
        """(superior, inferior) inward displacement fields at local (l, p)."""
        rl = l / half_w
        rp = p / half_d
        pa = KEYPOINT_P_FRACTION["A"]
        pp = KEYPOINT_P_FRACTION["P"]
        zero = np.zeros(np.broadcast(rl, rp).shape)
        if self.kind == "wedge":
            w = np.clip((rp - pp) / (pa - pp), 0.0, 1.08)
            sup = self.amplitude * w
            inf = 0.15 * self.amplitude * w
        elif self.kind == "biconcave":
            r2 = (rl / 0.8) ** 2 + (rp / 0.8) ** 2
            w = np.clip(1.0 - r2, 0.0, None) ** 1.2
            sup = 0.5 * self.amplitude * w
            inf = 0.5 * self.amplitude * w
        elif self.kind == "crush":
            r2 = rl ** 2 + rp ** 2
            w = 1.0 + 0.08 * np.clip(1.0 - r2, 0.0, None)
            sup = 0.5 * self.amplitude * w
            inf = 0.5 * self.amplitude * w
        else:
            sup = zero
            inf = zero
        sup = sup + zero
        inf = inf + zero
        for bl, bp, br, depth, which in self.bumps:
            g = depth * np.exp(-(((l - bl) ** 2 + (p - bp) ** 2) / (2.0 * br * br)))
            if which > 0:
                sup = sup + g
            else:
                inf = inf + g
        return sup, inf


@dataclass
class Fracture:
    grade: int
    morphology: str              # wedge | biconcave | crush
    target_loss: float
    deformation: Deformation
    sclerotic_hu: float = 250.0  # extra density of the compressed trabecular band
    cement: bool = False


# --------------------------------------------------------------------------------------------
# vertebra
# --------------------------------------------------------------------------------------------
@dataclass
class VertebraSpec:
    """One vertebra: sizes (mm), densities (HU), frame and optional fracture."""

    level: Level
    height: float            # body height at the rim (mm)
    width: float             # body width (left-right)
    depth: float             # body depth (antero-posterior)
    concavity: float         # depth of the normal endplate concavity (mm)
    tilt: float              # physiological hp - ha (mm); positive in the thoracic spine
    waist: float             # fractional narrowing of the body at mid-height
    canal_l: float           # spinal canal half width
    canal_p: float           # spinal canal half depth
    arch_t: float            # thickness of pedicles / laminae
    spinous_len: float
    spinous_angle: float     # radians below the horizontal (towards inferior)
    spinous_h: float         # half height of the spinous process
    tp_len: float            # transverse process length
    tp_angle: float          # radians posterior from pure lateral
    cortical_hu: float
    cancellous_hu: float
    cortical_mm: float
    body_offset_p: float = 0.0   # shift of the body along p (C1: anterior arch)
    dens: bool = False           # C2
    canal_center: float | None = None  # override of the canal centre along p (C1)
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    frame: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns e_l, e_p, e_u (LPS)
    fracture: Fracture | None = None
    sacrum: bool = False

    @property
    def label(self) -> int:
        return self.level.label

    @property
    def name(self) -> str:
        return self.level.name

    @property
    def canal_center_p(self) -> float:
        if self.canal_center is not None:
            return self.canal_center
        return self.depth / 2.0 + self.canal_p * 0.85

    # -- endplates ------------------------------------------------------------------------
    def endplates(self, l, p):
        """Superior and inferior endplate heights ``u`` (mm) at local (l, p), deformation included."""
        hw = self.width / 2.0
        hd = self.depth / 2.0
        pb = p - self.body_offset_p
        rl = l / hw
        rp = pb / hd
        r2 = rl * rl + rp * rp
        conc = self.concavity * np.clip(1.0 - r2, 0.0, None)
        t = (self.tilt / 4.0) * np.clip(rp, -1.2, 1.2) / abs(KEYPOINT_P_FRACTION["A"])
        top = self.height / 2.0 + t - conc
        bot = -self.height / 2.0 - t + conc
        if self.fracture is not None:
            sup, inf = self.fracture.deformation.offsets(l, pb, hw, hd)
            top = top - sup
            bot = bot + inf
        return top, bot

    def keypoints_local(self) -> dict[str, np.ndarray]:
        out = {}
        for key, frac in KEYPOINT_P_FRACTION.items():
            p = frac * self.depth / 2.0 + self.body_offset_p
            top, bot = self.endplates(np.array(0.0), np.array(p))
            out[f"{key}1"] = np.array([0.0, p, float(top)])
            out[f"{key}2"] = np.array([0.0, p, float(bot)])
        return out

    def heights(self) -> dict[str, float]:
        k = self.keypoints_local()
        return {
            "anterior": float(k["A1"][2] - k["A2"][2]),
            "middle": float(k["M1"][2] - k["M2"][2]),
            "posterior": float(k["P1"][2] - k["P2"][2]),
        }

    def keypoints_world(self) -> dict[str, np.ndarray]:
        return {k: self.center + self.frame @ v for k, v in self.keypoints_local().items()}

    def to_world(self, local: np.ndarray) -> np.ndarray:
        return self.center + self.frame @ local

    # -- extent ---------------------------------------------------------------------------
    def local_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Local AABB of everything this vertebra draws (body, arch, processes, disc margin)."""
        hw = self.width / 2.0
        reach_l = max(hw, self.canal_l + self.arch_t + self.tp_len + 6.0)
        back = self.canal_center_p + self.canal_p + self.arch_t + self.spinous_len + 8.0
        drop = np.sin(self.spinous_angle) * self.spinous_len + self.spinous_h + 4.0
        facet = 0.62 * self.height + 6.0  # articular processes reach beyond the endplates
        lo = np.array([-reach_l - 3.0, -self.depth / 2.0 + min(self.body_offset_p, 0) - 4.0,
                       -max(self.height / 2.0 + max(drop, 6.0), facet)])
        hi = np.array([reach_l + 3.0, back, max(self.height / 2.0 + (20.0 if self.dens else 6.0), facet)])
        return lo, hi


@dataclass
class RibSpec:
    """One rib as a polyline of world points (mm) with a radius; drawn as capsules."""

    label: int          # the vertebra it articulates with
    side: int           # +1 left, -1 right
    points: np.ndarray  # (n, 3)
    radius: float


@dataclass
class SoftTissue:
    """Body outline and organs, described as smooth functions of z (see render.py)."""

    z_knots: np.ndarray        # increasing z (mm)
    body_cx: np.ndarray        # body ellipse centre x per knot
    body_cy: np.ndarray
    body_ax: np.ndarray        # semi-axes
    body_ay: np.ndarray
    fat_mm: float
    spine_x: np.ndarray        # vertebral body centre per knot
    spine_y: np.ndarray
    spine_depth: np.ndarray    # body depth per knot (for the aorta position)
    lung_top: float            # z of the lung apices
    lung_bottom_l: float       # z of the diaphragm domes (left, right)
    lung_bottom_r: float
    cage_ax: np.ndarray        # inner rib cage semi-axes per knot (0 where there are no lungs)
    cage_ay: np.ndarray
    cage_cy: np.ndarray
    aorta_top: float
    aorta_bottom: float
    aorta_r: float
    aorta_hu: float
    muscle_hu: float
    fat_hu: float
    organ_hu: float
    table: dict | None
    gas: list                  # (x, y, z, r) bowel gas pockets
    extras: dict = field(default_factory=dict)  # liver, kidneys, psoas, retroperitoneal fat, trachea


@dataclass
class Anatomy:
    seed: int
    vertebrae: list[VertebraSpec]      # all levels of this spine, cranial to caudal (incl. sacrum)
    ribs: list[RibSpec]
    soft: SoftTissue
    low_density: bool
    screws: list                        # (label, start(3), end(3), radius) world
    texture_seed: int
    pelvis: list = field(default_factory=list)  # iliac wings (see render.render_pelvis)

    def by_label(self) -> dict[int, VertebraSpec]:
        return {v.label: v for v in self.vertebrae if not v.sacrum}

    def spine_levels(self) -> list[VertebraSpec]:
        return [v for v in self.vertebrae if not v.sacrum]


# --------------------------------------------------------------------------------------------
# sizes per level
# --------------------------------------------------------------------------------------------
def _interp_level(name: str, table: dict[str, float]) -> float:
    """Linear interpolation of a size table keyed by a few level names."""
    order = {lv.name: lv.order for lv in LEVELS}
    keys = sorted(table, key=lambda k: order[k])
    xs = [order[k] for k in keys]
    ys = [table[k] for k in keys]
    return float(np.interp(order[name], xs, ys))


_HEIGHT = {"C2": 15.0, "C3": 13.5, "C7": 14.5, "T1": 16.5, "T6": 19.5, "T12": 24.0, "T13": 24.5,
           "L1": 26.0, "L3": 27.5, "L5": 27.5, "L6": 27.0}
_WIDTH = {"C2": 16.0, "C3": 16.5, "C7": 22.0, "T1": 26.0, "T6": 29.0, "T12": 40.0, "T13": 41.0,
          "L1": 42.0, "L3": 46.0, "L5": 50.0, "L6": 50.0}
_DEPTH = {"C2": 15.0, "C3": 15.5, "C7": 16.5, "T1": 17.0, "T6": 23.0, "T12": 30.0, "T13": 31.0,
          "L1": 32.0, "L3": 34.0, "L5": 35.0, "L6": 35.0}
_DISC = {"C2": 4.5, "C7": 5.0, "T1": 4.0, "T5": 4.5, "T12": 6.5, "T13": 7.0, "L1": 8.0, "L4": 10.5,
         "L5": 10.0, "L6": 9.5}


def _level_names(t13: bool, l6: bool) -> list[Level]:
    out = []
    for lv in LEVELS:
        if lv.name == "T13" and not t13:
            continue
        if lv.name == "L6" and not l6:
            continue
        out.append(lv)
    return out


def make_vertebra(lv: Level, rng: np.random.Generator, scale: float, low_density: bool) -> VertebraSpec:
    name = lv.name
    region = name[0]
    jit = lambda s=0.025: float(rng.normal(1.0, s))  # noqa: E731
    if name == "C1":
        h, w, d = 10.0, 14.0, 7.0
    else:
        h = _interp_level(name, _HEIGHT)
        w = _interp_level(name, _WIDTH)
        d = _interp_level(name, _DEPTH)
    h *= scale * jit()
    w *= scale * jit()
    d *= scale * jit()
    if region == "C":
        canal_l, canal_p, arch_t = 11.5, 7.5, 3.5
        sp_len, sp_ang, sp_h = (28.0 if name == "C7" else 18.0), np.radians(rng.uniform(10, 25)), 3.5
        tp_len, tp_ang = 8.0, np.radians(-15.0)
        tilt = 0.0
    elif region == "T":
        canal_l, canal_p, arch_t = 8.0, 7.5, 4.5
        sp_len, sp_ang, sp_h = rng.uniform(34, 44), np.radians(rng.uniform(45, 60)), 4.5
        tp_len, tp_ang = _interp_level(name, {"T1": 20.0, "T6": 18.0, "T12": 10.0, "T13": 9.0}), np.radians(30.0)
        tilt = _interp_level(name, {"T1": 0.5, "T7": 1.8, "T12": 0.8, "T13": 0.6}) * jit(0.1)
    else:
        canal_l, canal_p, arch_t = 11.0, 8.0, 7.5
        sp_len, sp_ang, sp_h = rng.uniform(28, 34), np.radians(rng.uniform(5, 15)), 9.0
        tp_len, tp_ang = _interp_level(name, {"L1": 17.0, "L3": 24.0, "L5": 16.0, "L6": 15.0}), np.radians(5.0)
        tilt = _interp_level(name, {"L1": 0.3, "L3": -0.5, "L5": -1.5, "L6": -1.5}) * jit(0.1)
    canal_l *= scale
    canal_p *= scale
    if low_density:
        cort, canc, cort_mm = rng.uniform(380, 550), rng.uniform(40, 110), rng.uniform(0.6, 0.9)
    else:
        cort, canc, cort_mm = rng.uniform(650, 950), rng.uniform(150, 280), rng.uniform(0.9, 1.3)
    spec = VertebraSpec(
        level=lv, height=h, width=w, depth=d,
        concavity=min(rng.uniform(0.6, 1.4), 0.06 * h), tilt=tilt, waist=rng.uniform(0.04, 0.09),
        canal_l=canal_l, canal_p=canal_p, arch_t=arch_t * scale,
        spinous_len=sp_len * scale, spinous_angle=sp_ang, spinous_h=sp_h * scale,
        tp_len=tp_len * scale, tp_angle=tp_ang,
        cortical_hu=cort, cancellous_hu=canc, cortical_mm=cort_mm,
    )
    if name == "C1":
        spec.body_offset_p = -9.0 * scale
        spec.canal_l, spec.canal_p, spec.canal_center = 13.0 * scale, 15.0 * scale, 9.0 * scale
        spec.tp_len = 12.0 * scale
        spec.concavity, spec.tilt = 0.3, 0.0
    if name == "C2":
        spec.dens = True
    return spec


def sacrum_segments(rng: np.random.Generator, scale: float, l5: VertebraSpec) -> list[VertebraSpec]:
    """S1-S3 as fused, shrinking bodies (unlabelled: label 0 in the map)."""
    out = []
    for k, f in enumerate((1.0, 0.75, 0.55)):
        lv = Level(label=0, name=f"S{k + 1}", order=99 + k, sct_code=None)
        s = make_vertebra(LEVELS[-2], rng, scale, False)  # L5-like densities
        s.level = lv
        s.height = l5.height * (0.95 if k == 0 else 0.9)
        s.width = l5.width * f * (1.0 if k else 1.05)
        s.depth = l5.depth * (0.95 if k == 0 else 0.7 * f + 0.2)
        s.tilt = 0.0
        s.concavity = 0.3 if k == 0 else 0.0   # fused: no endplates between S1-S3
        s.waist = 0.0
        s.spinous_len = 12.0 * f
        s.spinous_h = 6.0
        s.tp_len = 30.0 * f          # the alae
        s.tp_angle = np.radians(-10.0)
        s.canal_l, s.canal_p, s.arch_t = 10.0 * f + 2.0, 5.0, 5.0
        s.sacrum = True
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------
# spine curve
# --------------------------------------------------------------------------------------------
@dataclass
class CurveParams:
    cervical: float
    thoracic: float
    lumbar: float
    sacral: float
    tilt: float
    scol_amp: float
    scol_period: float
    scol_phase: float
    rot_gain: float
    rot_noise: np.ndarray
    x0: float
    y0: float
    z0: float


def draw_curve_params(rng: np.random.Generator) -> CurveParams:
    scol = rng.uniform(0, 4) if rng.random() < 0.75 else rng.uniform(8, 25)
    return CurveParams(
        cervical=rng.uniform(6, 16), thoracic=rng.uniform(18, 40), lumbar=rng.uniform(14, 30),
        sacral=rng.uniform(50, 75), tilt=rng.uniform(-0.06, 0.06),
        scol_amp=scol, scol_period=rng.uniform(250, 500), scol_phase=rng.uniform(0, 2 * np.pi),
        rot_gain=rng.uniform(0.3, 0.8), rot_noise=rng.normal(0, np.radians(2.0), 8),
        x0=rng.uniform(-15, 15), y0=rng.uniform(10, 50), z0=rng.uniform(-300, 300),
    )


def place_vertebrae(verts: list[VertebraSpec], discs: list[float], cp: CurveParams) -> None:
    """Centres and frames along the curve (arc length counted from the top of C1 downwards)."""
    lengths = []
    for v in verts:
        h = v.height
        if v.fracture is not None and v.fracture.morphology == "crush":
            h -= v.fracture.deformation.amplitude  # the spine shortens with a crush fracture
        lengths.append(h)
    # arc positions of the body centres
    s_centres = []
    s = 0.0
    for k in range(len(verts)):
        s += lengths[k] / 2.0
        s_centres.append(s)
        s += lengths[k] / 2.0 + (discs[k] if k < len(discs) else 0.0)
    total = s
    names = [v.name for v in verts]

    def at(name_prefix_last: str, first: bool = False) -> float:
        idx = [k for k, n in enumerate(names) if n.startswith(name_prefix_last)]
        return s_centres[idx[0] if first else idx[-1]]

    s_c0, s_c1 = 0.0, at("C7")
    s_t1 = at("T", first=True)
    s_l0 = at("L", first=True)
    s_t_end = [s_centres[k] for k, n in enumerate(names) if n.startswith("T")][-1]
    s_l_end = [s_centres[k] for k, n in enumerate(names) if n.startswith("L")][-1]
    ss = np.arange(-40.0, total + 80.0, 1.0)
    y = np.zeros_like(ss)
    seg = lambda a, b: np.clip((ss - a) / (b - a), 0.0, 1.0)  # noqa: E731
    y -= cp.cervical * np.sin(np.pi * seg(s_c0, (s_c1 + s_t1) / 2))
    y += cp.thoracic * np.sin(np.pi * seg((s_c1 + s_t1) / 2, (s_t_end + s_l0) / 2))
    y -= cp.lumbar * np.sin(np.pi * seg((s_t_end + s_l0) / 2, s_l_end + 10.0))
    # sacrum: posterior-inferior sweep (sacral kyphosis)
    y += cp.sacral * seg(s_l_end + 5.0, total + 40.0) ** 1.15
    y += cp.tilt * ss
    x = cp.scol_amp * np.sin(2 * np.pi * ss / cp.scol_period + cp.scol_phase)
    x *= seg(s_c1 - 40, s_t1 + 30) * (1 - seg(s_l_end - 20, s_l_end + 30))
    x = gaussian_filter1d(x, 15.0, mode="nearest")
    y = gaussian_filter1d(y, 20.0, mode="nearest")
    pts = np.stack([x + cp.x0, y + cp.y0, -ss + cp.z0], axis=1)
    # re-parameterise by true arc length
    seglen = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seglen)]) - 40.0  # ss starts at -40
    tang = np.gradient(pts, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    # axial rotation follows the scoliosis (towards the convexity) plus a little noise
    curv_x = np.gradient(np.gradient(x))
    rot = -cp.rot_gain * curv_x * 100.0
    rot += np.interp(ss, np.linspace(ss[0], ss[-1], len(cp.rot_noise)), cp.rot_noise)
    for v, sc in zip(verts, s_centres):
        c = np.array([np.interp(sc, arc, pts[:, i]) for i in range(3)])
        t = np.array([np.interp(sc, arc, tang[:, i]) for i in range(3)])
        e_u = -t / np.linalg.norm(t)
        e_p = np.array([0.0, 1.0, 0.0]) - e_u[1] * e_u
        e_p /= np.linalg.norm(e_p)
        e_l = np.cross(e_p, e_u)
        ang = float(np.interp(sc, arc, rot))
        r = rotation_about(e_u, ang)
        v.center = c
        v.frame = np.stack([r @ e_l, r @ e_p, e_u], axis=1)
