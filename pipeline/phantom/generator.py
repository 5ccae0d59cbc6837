"""``generate(seed, ...)``: anatomy + acquisition + rendering + ground truth -> :class:`Phantom`.

Random streams are separated by purpose (``default_rng([seed, k])``): the anatomy does not change
when only the grid changes, so ``generate(s)`` (the DICOM study) and ``generate(s,
spacing_mm=2)`` (training) show the same patient, scan range and fractures.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.levels import BY_NAME, level_range
from pipeline.phantom import render as R
from pipeline.phantom.acquisition import Acquisition, Grid, blur_and_noise, draw_acquisition
from pipeline.phantom.anatomy import (
    _DISC,
    Anatomy,
    RibSpec,
    SoftTissue,
    VertebraSpec,
    _interp_level,
    _level_names,
    draw_curve_params,
    make_vertebra,
    place_vertebrae,
    sacrum_segments,
)
from pipeline.phantom.fractures import apply_fracture, choose_auto, parse_fractures
from pipeline.phantom.gt import genant_from_heights, label_centroids, reference_height, rounded

UID_ROOT = "2.25."
#: Bumped whenever the same seed starts to give a different phantom (key training caches on it).
PHANTOM_VERSION = 6
STREAM_ANATOMY, STREAM_ACQ, STREAM_FRACTURE, STREAM_NOISE, STREAM_EXTRA = 1, 2, 3, 4, 5


@dataclass
class Phantom:
    """A synthetic study: CT (int16 HU), VerSe label map on the same grid, and gt.json content."""

    ct: sitk.Image
    labels: sitk.Image
    gt: dict
    seed: int = 0
    acquisition: Acquisition | None = None
    grid: Grid | None = None
    uids: dict = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def derive_uid(seed: int, what: str) -> str:
    """A DICOM UID derived only from the seed (2.25 + 128-bit hash, at most 64 characters)."""
    h = hashlib.sha256(f"spine-node-phantom/{seed}/{what}".encode()).digest()
    return UID_ROOT + str(int.from_bytes(h[:16], "big"))


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------
def _extent_z(v: VertebraSpec) -> tuple[float, float]:
    """Lowest and highest world z of the vertebra's bone (drawn on a coarse 1.5 mm grid)."""
    lo, hi = v.local_extent()
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    w = v.center[None, :] + corners @ v.frame.T
    wlo, whi = w.min(axis=0), w.max(axis=0)
    step = 1.5
    shape = tuple(int(np.ceil((whi[a] - wlo[a]) / step)) + 1 for a in (2, 1, 0))
    g = Grid(shape=shape, spacing=(step, step, step), origin=wlo.copy())
    vol = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.uint8)
    tex = np.zeros((R.TEX_N,) * 3, np.float32)
    box = R.render_vertebra(v, g, vol, lab, tex, 1.0, write_label=True) if v.label else None
    if box is None or not (lab == v.label).any():
        return float(wlo[2]), float(whi[2])
    ks = np.nonzero((lab == v.label).any(axis=(1, 2)))[0]
    z = g.axis(2)
    return float(z[ks.min()] - step), float(z[ks.max()] + step)


def _soft_tissue(rng: np.random.Generator, verts: list[VertebraSpec], habitus: float, acq_table: bool,
                 ribs_out: list[RibSpec]) -> SoftTissue:
    spine = [v for v in verts]
    zs = np.array([v.center[2] for v in spine])
    order = np.argsort(zs)
    fat = float(rng.uniform(6, 32) * habitus)
    muscle = {"C": 22.0, "T": 18.0, "L": 32.0, "S": 30.0}
    half_w = {"C": 58.0, "T1": 128.0, "T4": 150.0, "T8": 160.0, "T12": 155.0, "L3": 150.0, "L5": 160.0, "S": 172.0}
    half_d = {"C": 52.0, "T1": 80.0, "T4": 100.0, "T8": 112.0, "T12": 112.0, "L3": 105.0, "L5": 108.0, "S": 110.0}

    def table_val(tab, v):
        if v.sacrum:
            return tab["S"]
        if v.name.startswith("C"):
            return tab["C"]
        keys = {k: tab[k] for k in tab if k not in ("C", "S")}
        return _interp_level(v.name, keys)

    rows = []
    for v in spine:
        reg = "S" if v.sacrum else v.name[0]
        back = (v.depth / 2 + 2 * v.canal_p + v.arch_t + v.spinous_len * np.cos(v.spinous_angle)
                + muscle[reg] + fat * (0.5 if reg == "C" else 1.0))
        ay = table_val(half_d, v) * (habitus if reg != "C" else 1.0) + (fat if reg != "C" else 0.0) * 0.5
        ax = table_val(half_w, v) * (habitus if reg != "C" else 1.0) + (fat if reg != "C" else 0.0) * 0.7
        y_back = v.center[1] + back
        rows.append((v.center[2], v.center[0], y_back - ay, ax, ay, v.center[0], v.center[1], v.depth))
    rows = np.array(rows)[order]
    # the body outline varies smoothly along the spine (no kinks at every vertebra)
    if len(rows) >= 5:
        k = np.ones(5) / 5.0
        for c in (1, 2, 3, 4):
            rows[:, c] = np.convolve(np.pad(rows[:, c], 2, mode="edge"), k, mode="valid")
    # extend the knots beyond the ends of the spine
    top = rows[-1].copy()
    top[0] += 150.0
    bot = rows[0].copy()
    bot[0] -= 150.0
    rows = np.vstack([bot, rows, top])
    zk = rows[:, 0]
    by_name = {v.name: v for v in verts}
    thor = [v for v in verts if v.name.startswith("T")]
    # rib cage (inner surface) per thoracic vertebra, from the ribs built below
    cage = {}
    fx = [0.42, 0.58, 0.68, 0.76, 0.83, 0.88, 0.92, 0.95, 0.97, 0.97, 0.95, 0.92, 0.9]
    fy = [0.55, 0.7, 0.8, 0.87, 0.92, 0.96, 0.98, 1.0, 1.0, 1.0, 0.98, 0.96, 0.95]
    end = [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.82, 0.8, 0.78, 0.62, 0.5, 0.4]
    # how far each rib descends from its head to its anterior end (the 7th rib ends about four
    # vertebrae lower than it starts; the costal margin reaches L2-L3)
    drop = [25, 40, 55, 65, 75, 85, 95, 100, 105, 100, 80, 60, 50]
    for k, v in enumerate(thor):
        z = v.center[2]
        bax = float(np.interp(z, zk, rows[:, 3]))
        bay = float(np.interp(z, zk, rows[:, 4]))
        bcy = float(np.interp(z, zk, rows[:, 2]))
        ax_ = (bax - fat - 14.0) * fx[k]
        back_y = None
        radius = float(np.interp(k, [0, 5, 12], [3.2, 4.3, 3.8]))
        pts_sides = []
        for sg in (1.0, -1.0):
            b = v.tp_angle
            d = np.array([sg * np.cos(b), np.sin(b), 0.0])
            st = np.array([sg * (v.canal_l + 0.5 * v.arch_t), v.canal_center_p - 0.2 * v.canal_p, 0.1 * v.height])
            tip = v.to_world(st + d * v.tp_len)
            head = v.to_world(np.array([sg * v.width / 2 * 0.8, v.depth / 2 * 0.55, 0.4 * v.height]))
            back_y = tip[1] + 9.0
            front_y = bcy - bay + fat + 12.0
            ay_ = (back_y - front_y) / 2 * fy[k]
            cy_ = back_y - ay_
            cx_ = v.center[0]
            th0 = float(np.arcsin(np.clip((abs(tip[0] - cx_) + 6.0) / max(ax_, 1.0), 0.0, 0.95)))
            th1 = float(end[k] * np.pi)
            arc = 0.5 * (ax_ + ay_) * (th1 - th0)
            n = max(int(arc / 9.0), 4)
            th = np.linspace(th0, th1, n)
            frac = (th - th0) / (th1 - th0)
            pts = np.stack([cx_ + sg * ax_ * np.sin(th), cy_ + ay_ * np.cos(th),
                            tip[2] - drop[k] * frac ** 1.2], axis=1)
            pts = np.vstack([head, tip, pts])
            ribs_out.append(RibSpec(label=v.label, side=int(sg), points=pts, radius=radius))
            pts_sides.append((cx_, cy_, ax_, ay_))
        cage[v.name] = (ax_ - radius - 4.0, ay_ - radius - 4.0, cy_)
    cage_ax = np.zeros(len(zk))
    cage_ay = np.zeros(len(zk))
    cage_cy = rows[:, 2].copy()
    vz = {v.name: v.center[2] for v in verts}
    for i, z in enumerate(zk):
        for name, (cax, cay, ccy) in cage.items():
            if abs(vz[name] - z) < 1e-6:
                cage_ax[i], cage_ay[i], cage_cy[i] = cax, cay, ccy
    t1 = by_name.get("T1")
    t4 = by_name.get("T4")
    t9 = by_name.get("T9")
    l4 = by_name.get("L4")
    lung_top = t1.center[2] + 22.0 if t1 is not None else -1e9
    base = t9.center[2] + rng.uniform(-10, 10) if t9 is not None else -1e9
    contrast = rng.random() < 0.35
    table = None
    if acq_table:
        y_table = float(np.max(rows[1:-1, 2] + rows[1:-1, 4])) + float(rng.uniform(0.5, 6.0))
        half = float(rng.uniform(190, 240))
        table = {"y": y_table, "thick": float(rng.uniform(25, 45)),
                 "x0": float(np.mean(rows[:, 1])) - half, "x1": float(np.mean(rows[:, 1])) + half,
                 "curve": float(rng.uniform(0.0, 3e-4))}  # mm of rise per mm^2 off the centre
    gas = []
    lum = [v for v in verts if v.name.startswith("L")]
    if lum:
        for _ in range(int(rng.integers(0, 7))):
            v = lum[int(rng.integers(0, len(lum)))]
            gas.append((v.center[0] + rng.uniform(-90, 90), v.center[1] - v.depth / 2 - rng.uniform(35, 85),
                        v.center[2] + rng.uniform(-20, 20), rng.uniform(5, 18)))
    zc = {n: v.center[2] for n, v in by_name.items()}
    dep = {n: v.depth for n, v in by_name.items()}
    lum_depth = dep.get("L3", 34.0)
    kid_hu = float(rng.uniform(140, 200) if contrast else rng.uniform(28, 38))
    extras = {
        "liver": {"z_top": base + 5.0, "z_bot": zc["L2"], "dx": -60.0 * habitus, "dy": -0.5 * lum_depth - 30.0,
                  "ax": 100.0 * habitus, "ay": 80.0 * habitus, "hu": float(rng.uniform(52, 66))},
        "kidneys": [
            {"zc": zc["L1"] - 12.0 * s_, "dz": float(rng.uniform(48, 60)), "dx": s_ * (0.65 * lum_depth + 48.0),
             "dy": 0.2 * lum_depth, "ax": float(rng.uniform(24, 30)), "ay": float(rng.uniform(20, 26)), "hu": kid_hu}
            for s_ in (-1.0, 1.0)
        ],
        "psoas": {"z_top": zc["T12"], "z_bot": zc["L5"] - 25.0, "r_top": 5.0,
                  "r_bot": float(rng.uniform(20, 27)) * habitus, "hu": float(rng.uniform(45, 58))},
        "retro_fat": {"z_top": zc["T12"] + 10.0, "z_bot": zc["L5"] - 20.0, "ax": 0.65 * lum_depth + 70.0 * habitus,
                      "ay": 0.5 * lum_depth + 22.0 * habitus},
        "trachea": {"z_top": zc["C5"], "z_bot": zc["T4"] + 5.0, "r": float(rng.uniform(8, 11))},
    }
    return SoftTissue(
        extras=extras,
        z_knots=zk, body_cx=rows[:, 1], body_cy=rows[:, 2], body_ax=rows[:, 3], body_ay=rows[:, 4],
        fat_mm=fat, spine_x=rows[:, 5], spine_y=rows[:, 6], spine_depth=rows[:, 7],
        lung_top=lung_top, lung_bottom_l=base - 12.0, lung_bottom_r=base,
        cage_ax=cage_ax, cage_ay=cage_ay, cage_cy=cage_cy,
        aorta_top=t4.center[2] if t4 is not None else -1e9,
        aorta_bottom=l4.center[2] if l4 is not None else 1e9,
        aorta_r=float(rng.uniform(9, 14)), aorta_hu=float(rng.uniform(180, 320) if contrast else rng.uniform(35, 50)),
        muscle_hu=float(rng.uniform(45, 60)), fat_hu=float(rng.uniform(-115, -85)),
        organ_hu=float(rng.uniform(30, 50)), table=table, gas=gas,
    )


def _pelvis(rng: np.random.Generator, verts: list[VertebraSpec], scale: float) -> list[dict]:
    """Iliac wings: curved plates (cylindrical shell sectors about a vertical axis) from the
    sacro-iliac joints up to the crest at about the L4-L5 disc."""
    sac = [v for v in verts if v.sacrum]
    l5 = [v for v in verts if not v.sacrum][-1]
    if not sac:
        return []
    s1, s2 = sac[0], sac[min(1, len(sac) - 1)]
    out = []
    for sg in (1.0, -1.0):
        # the wing is concave towards the front and the midline (iliac fossa): its axis lies
        # antero-medially, at the side of the sacrum
        si = s1.to_world(np.array([sg * (s1.width / 2 + 6.0), 0.25 * s1.depth, 0.0]))
        c = np.array([s1.center[0] + sg * 0.55 * s1.width, s1.center[1] - 40.0 * scale])
        d = si[:2] - c
        r0 = float(np.hypot(*d))
        phi0 = float(np.arctan2(sg * d[0], d[1]))
        out.append({
            "side": sg, "cx": float(c[0]), "cy": float(c[1]),
            "r_bot": r0, "r_top": r0 + float(rng.uniform(38, 52)) * scale,
            "z_top": float(l5.center[2] + 0.35 * l5.height + rng.uniform(-5, 8)),
            "z_bot": float(s2.center[2] - 15.0),
            "phi0": phi0 - 0.1, "phi1_top": float(np.radians(rng.uniform(125, 145))),
            "phi1_bot": phi0 + 1.0, "thick": float(rng.uniform(6.0, 9.0)) * scale,
        })
    return out


@dataclass
class Scene:
    anatomy: Anatomy
    covered: list[str]
    z_range: tuple[float, float]
    fov_center: tuple[float, float]
    variants: dict


def build_scene(seed: int, levels: str | None, fractures: str | None, acq: Acquisition) -> Scene:
    rng = np.random.default_rng([seed, STREAM_ANATOMY])
    want = []
    if levels:
        # T13 and L6 only when the range names them (level_range lists them as possible levels)
        ends = {lv.name for lv in (level_range(levels)[0], level_range(levels)[-1])}
        want = [lv.name for lv in level_range(levels) if lv.name not in ("T13", "L6") or lv.name in ends]
    t13 = rng.random() < 0.06
    l6 = (not t13) and rng.random() < 0.05
    if "T13" in want:
        t13 = True
    if "L6" in want:
        l6 = True
    scale = float(np.clip(rng.normal(1.0, 0.06), 0.86, 1.16))
    habitus = float(np.clip(rng.normal(1.0, 0.1), 0.8, 1.3))
    low_density = bool(rng.random() < 0.15)
    lvls = _level_names(t13, l6)
    verts = [make_vertebra(lv, rng, scale, low_density) for lv in lvls]
    verts += sacrum_segments(rng, scale, verts[-1])
    discs = []
    for a, b in zip(verts[:-1], verts[1:]):
        if a.name == "C1":
            discs.append(1.0)
        elif a.sacrum and b.sacrum:
            discs.append(-6.0)  # fused
        elif b.sacrum:
            discs.append(10.0 * scale)
        else:
            discs.append(_interp_level(a.name, _DISC) * scale * float(rng.normal(1.0, 0.06)))
    cp = draw_curve_params(rng)
    names = [v.name for v in verts if not v.sacrum]
    for w in want:
        if w not in names:
            raise ValueError(f"level {w} is not in this phantom's spine")
    # covered range
    if want:
        # the range of *this* spine: T13 is inside T10-L2 when this patient has one
        covered = names[names.index(want[0]):names.index(want[-1]) + 1]
    else:
        n = min(acq.n_levels, len(names))
        start = int(np.floor(acq.first_level_fraction * (len(names) - n + 1)))
        start = min(start, len(names) - n)
        covered = names[start:start + n]
    # fractures
    frng = np.random.default_rng([seed, STREAM_FRACTURE])
    parsed = parse_fractures(fractures)
    if parsed == "auto":
        inner = covered[1:-1] if len(covered) > 2 else covered
        reqs = choose_auto(frng, inner)
    else:
        reqs = parsed
        for r in reqs:
            if r.name not in names:
                raise ValueError(f"fracture at {r.name}: this phantom has no {r.name}")
    spine = [v for v in verts if not v.sacrum]
    order = [v.label for v in spine]
    normal_heights = {v.label: v.heights() for v in spine}
    fractured = {BY_NAME[r.name].label for r in reqs}
    byname = {v.name: v for v in verts}
    for r in reqs:
        ref = reference_height(order, normal_heights, fractured, BY_NAME[r.name].label)
        apply_fracture(byname[r.name], r, ref, frng)
    place_vertebrae(verts, discs, cp)
    ribs: list[RibSpec] = []
    soft = _soft_tissue(rng, verts, habitus, acq.table, ribs)
    # a metal screw pair (posterior fixation) now and then
    xrng = np.random.default_rng([seed, STREAM_EXTRA])
    screws = []
    cands = [n for n in covered[1:-1] if n[0] in "TL"]
    if cands and xrng.random() < 0.08:
        v = byname[cands[int(xrng.integers(0, len(cands)))]]
        rad = 3.0 if v.name.startswith("L") else 2.4
        for sg in (1.0, -1.0):
            st = np.array([sg * (v.canal_l + v.arch_t + 6.0), v.canal_center_p + v.canal_p + 8.0, 0.12 * v.height])
            en = np.array([sg * 0.1 * v.width, -0.25 * v.depth, 0.05 * v.height])
            screws.append({"label": v.label, "start": v.to_world(st), "end": v.to_world(en), "radius": rad})
    anatomy = Anatomy(seed=seed, vertebrae=verts, ribs=ribs, soft=soft, low_density=low_density,
                      screws=screws, texture_seed=seed, pelvis=_pelvis(rng, verts, scale))
    # z range of the scan
    first, last = byname[covered[0]], byname[covered[-1]]
    ft_lo, ft_hi = _extent_z(first)
    lt_lo, lt_hi = _extent_z(last)
    if want:
        z_top = ft_hi + 1.0
        z_bot = lt_lo - 1.0
    else:
        z_top = first.center[2] + acq.top_margin * 1.2 * (ft_hi - first.center[2])
        z_bot = last.center[2] - acq.bottom_margin * 1.2 * (last.center[2] - lt_lo)
        if last.name in ("L5", "L6") and acq.bottom_margin > 0.4:
            z_bot -= (acq.bottom_margin - 0.4) * 110.0  # lumbar scans usually reach into the sacrum
    cov = [byname[n] for n in covered]
    sx = float(np.mean([v.center[0] for v in cov]))
    sy = float(np.mean([v.center[1] for v in cov]))
    fov = acq.matrix * acq.pixel_spacing
    if fov > 330:
        zc = 0.5 * (z_top + z_bot)
        cy = float(np.interp(zc, soft.z_knots, soft.body_cy))
        center = (sx + acq.fov_dx * 0.5, cy + acq.fov_dy * 0.2)
    else:
        center = (sx + acq.fov_dx * 0.3, sy + 0.5 * acq.fov_dy)
    variants = {"T13": t13, "L6": l6, "low_density": low_density,
                "cement": any(v.fracture is not None and v.fracture.cement for v in verts),
                "screws": bool(screws), "table": soft.table is not None,
                "contrast": soft.aorta_hu > 100}
    return Scene(anatomy=anatomy, covered=covered, z_range=(z_bot, z_top), fov_center=center, variants=variants)


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------
def acquisition_grid(scene: Scene, acq: Acquisition, n_slices: int | None = None) -> Grid:
    z_bot, z_top = scene.z_range
    ss = acq.slice_spacing
    nz = n_slices or max(int(np.ceil((z_top - z_bot) / ss - 1e-6)) + 1, 1)
    if n_slices:
        mid = 0.5 * (z_top + z_bot)
        z_top = mid + 0.5 * (nz - 1) * ss
        z_bot = z_top - (nz - 1) * ss
    n = acq.matrix
    ps = acq.pixel_spacing
    cx, cy = scene.fov_center
    half = ps * (n - 1) / 2.0
    if acq.head_first:
        sign = (1, 1, 1)
        origin = np.array([cx - half, cy - half, z_top - (nz - 1) * ss])
    else:
        sign = (-1, 1, -1)
        origin = np.array([cx + half, cy - half, z_top])
    return Grid(shape=(nz, n, n), spacing=(ps, ps, ss), origin=origin, sign=sign)


def iso_grid(scene: Scene, acq: Acquisition, spacing: float) -> Grid:
    z_bot, z_top = scene.z_range
    fov = acq.matrix * acq.pixel_spacing
    n = max(int(np.ceil(fov / spacing)), 8)
    nz = max(int(np.ceil((z_top - z_bot) / spacing - 1e-6)) + 1, 1)
    cx, cy = scene.fov_center
    half = spacing * (n - 1) / 2.0
    return Grid(shape=(nz, n, n), spacing=(spacing,) * 3,
                origin=np.array([cx - half, cy - half, z_top - (nz - 1) * spacing]))


def to_sitk(arr: np.ndarray, grid: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in grid.spacing))
    img.SetOrigin(tuple(float(o) for o in grid.origin))
    img.SetDirection(tuple(float(d) for d in grid.direction.flatten()))
    return img


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------
def generate(seed: int, levels: str | None = None, fractures: str | None = "auto",
             spacing_mm: float | None = None, acquisition: dict | None = None) -> Phantom:
    """A synthetic spine CT with exact ground truth (docs/internal-interfaces.md, "Phantom").

    ``levels``: e.g. ``"T8-L5"`` (covered range; default: 5-17 random contiguous levels).
    ``fractures``: ``"auto"`` (0-3), ``"none"`` or ``"L1:2:wedge,T12:1:biconcave"``.
    ``spacing_mm``: ``None`` = the seed's acquisition grid (the DICOM study); a number = an
    isotropic LPS grid of that spacing over the same field of view (fast; for training).
    ``acquisition``: overrides of :class:`Acquisition` fields, plus ``n_slices`` (tests, benchmarks).
    """
    seed = int(seed)
    acq = draw_acquisition(np.random.default_rng([seed, STREAM_ACQ]))
    overrides = dict(acquisition or {})
    n_slices = overrides.pop("n_slices", None)
    if overrides:
        acq = dataclasses.replace(acq, **overrides)
    scene = build_scene(seed, levels, fractures, acq)
    if spacing_mm is None:
        grid = acquisition_grid(scene, acq, n_slices)
        thickness = acq.slice_thickness
        sigma = acq.noise_sigma
        corr = acq.noise_corr_px
    else:
        grid = iso_grid(scene, acq, float(spacing_mm))
        thickness = max(acq.slice_thickness, 0.0)
        v_acq = acq.pixel_spacing ** 2 * acq.slice_spacing
        sigma = acq.noise_sigma * float(np.sqrt(v_acq / float(spacing_mm) ** 3))
        corr = 0.6
    vol, lab, boxes = R.render(scene.anatomy, grid)
    blur_and_noise(vol, grid, acq.psf_fwhm, thickness, np.random.default_rng([seed, STREAM_NOISE]),
                   sigma, min_corr_px=corr)
    lo, hi = (-1024.0, 3071.0) if not acq.signed else (-1024.0, 8191.0)
    np.clip(vol, lo, hi, out=vol)
    ct = np.rint(vol).astype(np.int16)
    del vol
    if acq.circle_padding and spacing_mm is None:
        n = grid.shape[1]
        c = (n - 1) / 2.0
        yy, xx = np.mgrid[0:n, 0:n]
        outside = (xx - c) ** 2 + (yy - c) ** 2 > (n / 2.0) ** 2
        ct[:, outside] = -2048 if acq.signed else -1024
    uids = {
        "study_instance_uid": derive_uid(seed, "study"),
        "series_instance_uid": derive_uid(seed, "series"),
        "frame_of_reference_uid": derive_uid(seed, "frame"),
    }
    gt = build_gt(seed, scene, grid, lab, boxes, uids, acq, spacing_mm)
    return Phantom(ct=to_sitk(ct, grid), labels=to_sitk(lab, grid), gt=gt, seed=seed,
                   acquisition=acq, grid=grid, uids=uids,
                   meta={"covered": scene.covered, "variants": scene.variants,
                         "iso": spacing_mm is not None})


def build_gt(seed: int, scene: Scene, grid: Grid, lab: np.ndarray, boxes: dict, uids: dict,
             acq: Acquisition, spacing_mm: float | None) -> dict:
    anat = scene.anatomy
    spine = anat.spine_levels()
    order = [v.label for v in spine]
    heights = {v.label: v.heights() for v in spine}
    fractured_design = {v.label for v in spine if v.fracture is not None}
    cents = label_centroids(lab, boxes, grid.index_to_world)
    out = []
    for v in spine:
        if v.label not in cents:
            continue
        hts = heights[v.label]
        ref = reference_height(order, heights, fractured_design, v.label)
        loss, grade, morph = genant_from_heights(hts, ref)
        kp = v.keypoints_world()
        out.append({
            "label": v.label,
            "name": v.name,
            "centroid_mm": rounded(cents[v.label]["centroid_mm"]),
            "partial": bool(cents[v.label]["touches_edge"]),
            "fractured": bool(grade > 0),
            "genant_grade": int(grade),
            "morphology": morph.value,
            "heights_mm": {k: round(float(h), 4) for k, h in hts.items()},
            "height_loss": round(float(loss), 4),
            "reference_height_mm": None if ref is None else round(float(ref), 4),
            "keypoints_mm": {k: rounded(p) for k, p in kp.items()},
            "voxels": cents[v.label]["voxels"],
            "cement": bool(v.fracture is not None and v.fracture.cement),
        })
    return {
        "phantom_version": PHANTOM_VERSION,
        "seed": seed,
        "study_instance_uid": uids["study_instance_uid"],
        "series_instance_uid": uids["series_instance_uid"],
        "frame_of_reference_uid": uids["frame_of_reference_uid"],
        "levels": scene.covered,
        "variants": scene.variants,
        "grid": {"shape_zyx": list(grid.shape), "spacing_mm": [float(s) for s in grid.spacing],
                 "origin_mm": [float(o) for o in grid.origin],
                 "direction": [float(d) for d in grid.direction.flatten()],
                 "isotropic": spacing_mm is not None},
        "acquisition": {k: (float(v) if isinstance(v, (np.floating,)) else v)
                        for k, v in dataclasses.asdict(acq).items()},
        "vertebrae": out,
    }
