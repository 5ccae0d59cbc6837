"""Voxelisation of the anatomy on a grid (physical mm in, HU and VerSe labels out).

Every structure is evaluated only inside its own bounding box (per vertebra, per primitive of a
vertebra, per rib segment, per disc), with coordinates built from the grid's 1-D axis arrays, so
the cost scales with the bone volume rather than with the matrix. Bone edges are partial-volume
anti-aliased from a signed distance, so thin cortices look the same family at 0.5 mm and at 2 mm.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from pipeline.phantom.acquisition import Grid
from pipeline.phantom.anatomy import (
    Anatomy,
    RibSpec,
    SoftTissue,
    VertebraSpec,
    oriented_box_sdf,
    superellipse_sdf,
)

AIR_HU = -1000.0
FAR = np.float32(1e3)

# --------------------------------------------------------------------------------------------
# trabecular texture: a periodic band-pass noise tile sampled at world positions
# --------------------------------------------------------------------------------------------
TEX_N = 64
TEX_STEP = 0.5  # mm per tile voxel


def make_texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    t = rng.standard_normal((TEX_N,) * 3).astype(np.float32)
    fine = gaussian_filter(t, 1.0, mode="wrap")
    coarse = gaussian_filter(t, 3.0, mode="wrap")
    band = fine - coarse
    band /= band.std() + 1e-6
    return band.astype(np.float32)


def sample_texture(tex: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    ix = np.floor(x / TEX_STEP).astype(np.int64) % TEX_N
    iy = np.floor(y / TEX_STEP).astype(np.int64) % TEX_N
    iz = np.floor(z / TEX_STEP).astype(np.int64) % TEX_N
    return tex[iz, iy, ix]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _world_aabb(center: np.ndarray, frame: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    w = center[None, :] + corners @ frame.T
    return w.min(axis=0), w.max(axis=0)


def _axes(grid: Grid, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kz, jy, ix = sl
    return (grid.axis(0)[ix], grid.axis(1)[jy], grid.axis(2)[kz])


def _local(grid: Grid, sl, center: np.ndarray, frame: np.ndarray):
    """Local (l, p, u) coordinates (float32, box-shaped) of the voxels of slice tuple ``sl``."""
    x, y, z = _axes(grid, sl)
    dx = (x - center[0]).astype(np.float32)[None, None, :]
    dy = (y - center[1]).astype(np.float32)[None, :, None]
    dz = (z - center[2]).astype(np.float32)[:, None, None]
    f = frame.astype(np.float32)
    return tuple((f[0, c] * dx + f[1, c] * dy) + f[2, c] * dz for c in range(3))


def _sub(outer, inner):
    """Slices of ``inner`` (absolute) relative to the box ``outer``."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for o, i in zip(outer, inner))


def _intersect(a, b):
    out = []
    for x, y in zip(a, b):
        s, e = max(x.start, y.start), min(x.stop, y.stop)
        if e <= s:
            return None
        out.append(slice(s, e))
    return tuple(out)


def _paint(vol_box: np.ndarray, sdf: np.ndarray, h: float, hu) -> np.ndarray:
    """Blend ``hu`` into ``vol_box`` with the anti-aliased occupancy of ``sdf``; returns the mask."""
    occ = np.clip(np.float32(0.5) - sdf / np.float32(h), 0.0, 1.0)
    m = occ > 0
    if np.isscalar(hu):
        vol_box[m] += occ[m] * (np.float32(hu) - vol_box[m])
    else:
        vol_box[m] += occ[m] * (hu[m] - vol_box[m])
    return m


# --------------------------------------------------------------------------------------------
# vertebra primitives (local frame)
# --------------------------------------------------------------------------------------------
def _body_sdf(v: VertebraSpec, l, p, u):
    hw, hd = v.width / 2.0, v.depth / 2.0
    pb = p - np.float32(v.body_offset_p)
    t = np.clip(u * np.float32(2.0 / v.height), -1.0, 1.0)
    w = 1.0 - np.float32(v.waist) * (1.0 - t * t)
    la = l / w
    pa = pb / w
    rb = np.where(pa < 0, np.float32(hd), np.float32(1.35 * hd))
    s = superellipse_sdf(la, pa, hw, rb) * w
    s = np.maximum(s, pb - np.float32(hd))
    top, bot = v.endplates(l, p)
    return np.maximum(np.maximum(s, u - top), bot - u)


def _primitives(v: VertebraSpec):
    """(local_lo, local_hi, fn(l, p, u) -> sdf) for each part of the vertebra."""
    hw, hd, H = v.width / 2.0, v.depth / 2.0, v.height
    prims = []
    maxdef = 0.0
    if v.fracture is not None:
        maxdef = abs(v.fracture.deformation.amplitude) + 2.0
    lo = np.array([-hw * 1.05 - 2, -hd + v.body_offset_p - 2, -H / 2 - 2 - v.concavity])
    hi = np.array([hw * 1.05 + 2, hd + v.body_offset_p + 2, H / 2 + 2 + v.tilt])
    prims.append((lo, hi, lambda l, p, u: _body_sdf(v, l, p, u)))
    pc, cl, cp, t = v.canal_center_p, v.canal_l, v.canal_p, v.arch_t
    is_c1 = v.name == "C1"
    u_hi, u_lo = (0.45 * H, -0.45 * H) if is_c1 else (0.38 * H, -0.42 * H)
    join = -1e3 if is_c1 else hd * 0.93  # behind the posterior Genant keypoints (P1, P2)

    def ring(l, p, u):
        dp = p - np.float32(pc)
        s = np.maximum(superellipse_sdf(l, dp, cl + t, cp + t), -superellipse_sdf(l, dp, cl, cp))
        s = np.maximum(s, np.float32(join) - p)
        return np.maximum(s, np.maximum(u - np.float32(u_hi), np.float32(u_lo) - u))

    prims.append((np.array([-cl - t - 1, max(pc - cp - t, join) - 1, u_lo - 1]),
                  np.array([cl + t + 1, pc + cp + t + 1, u_hi + 1]), ring))
    # spinous process: a plate running posteriorly and caudally from the laminae
    a = v.spinous_angle
    d = np.array([0.0, np.cos(a), -np.sin(a)])
    start = np.array([0.0, pc + cp + 0.5 * t, -0.05 * H])
    ln = v.spinous_len
    lat = 2.2 if v.name.startswith("C") else 3.6 if v.name.startswith("L") else 3.0
    ax = np.stack([d, [1.0, 0, 0], np.cross(d, [1.0, 0, 0])])
    half = np.array([ln / 2 + t / 2, lat, v.spinous_h])
    cen = start + d * ln / 2
    prims.append(_box_prim(cen, ax, half))
    # transverse processes
    for sg in (1.0, -1.0):
        b = v.tp_angle
        d = np.array([sg * np.cos(b), np.sin(b), 0.0])
        st = np.array([sg * (cl + 0.5 * t), pc - 0.2 * cp, (0.1 if v.name.startswith("T") else 0.0) * H])
        if v.name.startswith("L"):
            hp, hu_ = 3.4, 5.0
        elif v.name.startswith("C"):
            hp, hu_ = 3.0, 3.0
        elif v.sacrum:
            hp, hu_ = 12.0, H * 0.45
        else:
            hp, hu_ = 4.5, 4.5
        ax = np.stack([d, np.cross([0, 0, 1.0], d), [0, 0, 1.0]])
        prims.append(_box_prim(st + d * v.tp_len / 2, ax, np.array([v.tp_len / 2 + 2, hp, hu_])))
        if v.sacrum:
            continue
        # articular processes (superior slightly lateral, inferior slightly medial)
        for up in (1.0, -1.0):
            x = sg * (cl + 0.4 * t + (1.5 if up > 0 else -1.5))
            cen = np.array([x, pc + 0.15 * cp, up * (0.42 * H + 2.5)])
            prims.append(_box_prim(cen, np.eye(3), np.array([3.0, 4.0, 0.18 * H + 2.5])))
        if is_c1:
            cen = np.array([sg * (cl + 0.5 * t), pc - 0.35 * cp, 0.0])
            prims.append(_box_prim(cen, np.eye(3), np.array([5.0, 7.0, 0.6 * H])))
    if v.dens:
        def dens(l, p, u):
            s = superellipse_sdf(l, p, 4.6, 5.2)
            return np.maximum(s, np.maximum(u - np.float32(H / 2 + 15), np.float32(H / 2 - 3) - u))
        prims.append((np.array([-6.0, -7.0, H / 2 - 4]), np.array([6.0, 7.0, H / 2 + 16]), dens))
    return prims, maxdef


def _box_prim(center, axes, half):
    r = np.abs(axes).T @ half  # local AABB half extent of an oriented box
    return (center - r - 1.0, center + r + 1.0,
            lambda l, p, u: oriented_box_sdf(l, p, u, center, axes, half))


def render_vertebra(v: VertebraSpec, grid: Grid, vol: np.ndarray, lab: np.ndarray, tex: np.ndarray,
                    h: float, write_label: bool = True):
    """Draw one vertebra; returns its grid box (k, j, i slices) or None."""
    prims, _ = _primitives(v)
    boxes = []
    for lo, hi, _fn in prims:
        wlo, whi = _world_aabb(v.center, v.frame, lo, hi)
        b = grid.box(wlo - h, whi + h)
        boxes.append(b)
    valid = [b for b in boxes if b is not None]
    if not valid:
        return None
    box = tuple(slice(min(b[a].start for b in valid), max(b[a].stop for b in valid)) for a in range(3))
    shape = tuple(s.stop - s.start for s in box)
    sdf = np.full(shape, FAR, dtype=np.float32)
    for (_lo, _hi, fn), b in zip(prims, boxes):
        if b is None:
            continue
        l, p, u = _local(grid, b, v.center, v.frame)
        r = _sub(box, b)
        np.minimum(sdf[r], fn(l, p, u), out=sdf[r])
    m = sdf < np.float32(0.5 * h)
    if not m.any():
        return None
    kk, jj, ii = np.nonzero(m)
    x, y, z = _axes(grid, box)
    wx, wy, wz = x[ii], y[jj], z[kk]
    s = sdf[m]
    occ = np.clip(0.5 - s / h, 0.0, 1.0)
    inner = np.clip(0.5 - (s + v.cortical_mm) / h, 0.0, 1.0)
    canc = v.cancellous_hu + 55.0 * sample_texture(tex, wx, wy, wz)
    if v.fracture is not None:
        canc = canc + _sclerotic(v, wx, wy, wz)
    hu = v.cortical_hu + (canc - v.cortical_hu) * inner
    vb = vol[box]
    cur = vb[m]
    vb[m] = cur + occ * (hu - cur)
    if write_label and v.label > 0:
        lb = lab[box]
        lb[sdf <= 0] = v.label
    if v.fracture is not None and v.fracture.cement:
        _cement(v, grid, vol, tex, h)
    return box


def _sclerotic(v: VertebraSpec, wx, wy, wz) -> np.ndarray:
    """Band of compressed, denser trabeculae under the deformed endplate(s)."""
    d = np.stack([wx, wy, wz], axis=1) - v.center[None, :]
    loc = d @ v.frame
    l, p, u = loc[:, 0], loc[:, 1], loc[:, 2]
    top, bot = v.endplates(l, p)
    fr = v.fracture
    hw, hd = v.width / 2.0, v.depth / 2.0
    sup, inf = fr.deformation.offsets(l, p - v.body_offset_p, hw, hd)
    amp = max(fr.deformation.amplitude, 0.5)
    ws = np.clip(sup / (0.3 * amp), 0.0, 1.0)
    wi = np.clip(inf / (0.3 * amp), 0.0, 1.0)
    band = ws * np.exp(-((top - u - 3.0) ** 2) / 8.0) + wi * np.exp(-((u - bot - 3.0) ** 2) / 8.0)
    return fr.sclerotic_hu * band


def _cement(v: VertebraSpec, grid: Grid, vol: np.ndarray, tex: np.ndarray, h: float) -> None:
    """Vertebroplasty cement: an irregular blob in the anterior two thirds of the body (~2500 HU)."""
    r = np.array([0.32 * v.width, 0.3 * v.depth, 0.28 * v.height])
    c = np.array([0.0, -0.15 * v.depth + v.body_offset_p, 0.0])
    wlo, whi = _world_aabb(v.center, v.frame, c - r - 3, c + r + 3)
    b = grid.box(wlo, whi)
    if b is None:
        return
    l, p, u = _local(grid, b, v.center, v.frame)
    q = np.sqrt(((l - c[0]) / r[0]) ** 2 + ((p - c[1]) / r[1]) ** 2 + ((u - c[2]) / r[2]) ** 2)
    x, y, z = _axes(grid, b)
    t = sample_texture(tex, x[None, None, :] * 0.5, y[None, :, None] * 0.5, z[:, None, None] * 0.5)
    sdf = (q - 1.0 + 0.18 * t) * np.float32(r.min())
    top, bot = v.endplates(l, p)
    sdf = np.maximum(sdf, np.maximum(u - top + 1.5, bot + 1.5 - u))
    _paint(vol[b], sdf, h, 2500.0)


# --------------------------------------------------------------------------------------------
# discs, ribs, screws
# --------------------------------------------------------------------------------------------
def _polar(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def render_disc(a: VertebraSpec, b: VertebraSpec, grid: Grid, vol: np.ndarray, h: float) -> None:
    """Intervertebral disc between ``a`` (upper) and ``b`` (lower): fills the space between the
    inferior endplate of ``a`` and the superior endplate of ``b``, deformations included."""
    pa = a.to_world(np.array([0.0, a.body_offset_p, -a.height / 2]))
    pb = b.to_world(np.array([0.0, 0.0, b.height / 2]))
    mid = (pa + pb) / 2
    frame = _polar((a.frame + b.frame) / 2)
    gap = float(np.linalg.norm(pa - pb))
    hw = (a.width + b.width) / 4 + 0.8
    hd = (a.depth + b.depth) / 4 + 0.8
    dmax = max(a.concavity, b.concavity) + 3.0
    for v in (a, b):
        if v.fracture is not None:
            dmax += abs(v.fracture.deformation.amplitude) * 1.1
    lo = np.array([-hw - 2, -hd - 2, -gap / 2 - dmax])
    hi = np.array([hw + 2, hd + 2, gap / 2 + dmax])
    wlo, whi = _world_aabb(mid, frame, lo, hi)
    box = grid.box(wlo, whi)
    if box is None:
        return
    l, p, u = _local(grid, box, mid, frame)
    s = superellipse_sdf(l, p, hw, np.where(p < 0, np.float32(hd), np.float32(1.35 * hd)))
    s = np.maximum(s, p - np.float32(hd))
    la, pa_, ua = _local(grid, box, a.center, a.frame)
    _, bot_a = a.endplates(la, pa_)
    s = np.maximum(s, ua - bot_a)
    del la, pa_, ua
    lb, pb_, ub = _local(grid, box, b.center, b.frame)
    top_b, _ = b.endplates(lb, pb_)
    s = np.maximum(s, top_b - ub)
    del lb, pb_, ub
    r2 = (l / hw) ** 2 + (p / hd) ** 2
    hu = 92.0 - 30.0 * np.exp(-r2 / 0.25)
    _paint(vol[box], s, h, hu.astype(np.float32))


def render_capsule(grid: Grid, vol: np.ndarray, a: np.ndarray, b: np.ndarray, r: float, h: float,
                   hu_shell: float, hu_core: float | None, shell_mm: float = 1.0,
                   tex: np.ndarray | None = None) -> None:
    lo = np.minimum(a, b) - r - h
    hi = np.maximum(a, b) + r + h
    box = grid.box(lo, hi)
    if box is None:
        return
    x, y, z = _axes(grid, box)
    d = (b - a).astype(np.float32)
    dd = float(d @ d) or 1e-6
    px = (x - a[0]).astype(np.float32)[None, None, :]
    py = (y - a[1]).astype(np.float32)[None, :, None]
    pz = (z - a[2]).astype(np.float32)[:, None, None]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / np.float32(dd), 0.0, 1.0)
    ex, ey, ez = px - t * d[0], py - t * d[1], pz - t * d[2]
    sdf = np.sqrt(ex * ex + ey * ey + ez * ez) - np.float32(r)
    if hu_core is None:
        _paint(vol[box], sdf, h, hu_shell)
        return
    inner = np.clip(0.5 - (sdf + shell_mm) / h, 0.0, 1.0)
    core = np.float32(hu_core)
    if tex is not None:
        core = core + 40.0 * sample_texture(tex, x[None, None, :], y[None, :, None], z[:, None, None])
    hu = np.float32(hu_shell) + (core - np.float32(hu_shell)) * inner
    _paint(vol[box], sdf, h, hu)


def render_rib(rib: RibSpec, grid: Grid, vol: np.ndarray, h: float, tex: np.ndarray,
               cortical: float, marrow: float) -> None:
    pts = rib.points
    n = len(pts) - 1
    for k in range(n):
        cart = k >= n - max(2, n // 5) and rib.label <= 17  # costal cartilage of the true ribs
        if cart:
            render_capsule(grid, vol, pts[k], pts[k + 1], rib.radius * 0.9, h, 130.0, None)
        else:
            render_capsule(grid, vol, pts[k], pts[k + 1], rib.radius, h, cortical, marrow,
                           shell_mm=0.9, tex=tex)


def render_pelvis(wings: list[dict], grid: Grid, vol: np.ndarray, h: float, tex: np.ndarray,
                  cortical: float, marrow: float) -> None:
    """Iliac wings as cylindrical shell sectors (radius and angular extent vary with z)."""
    for w in wings:
        rmax = w["r_top"] + w["thick"]
        lo = np.array([w["cx"] - rmax, w["cy"] - rmax, w["z_bot"]]) - 2
        hi = np.array([w["cx"] + rmax, w["cy"] + rmax, w["z_top"]]) + 2
        box = grid.box(lo, hi)
        if box is None:
            continue
        x, y, z = _axes(grid, box)
        dx = (x - w["cx"]).astype(np.float32)[None, None, :]
        dy = (y - w["cy"]).astype(np.float32)[None, :, None]
        t = np.clip((z - w["z_bot"]) / (w["z_top"] - w["z_bot"]), 0, 1).astype(np.float32)[:, None, None]
        r = np.sqrt(dx * dx + dy * dy)
        R = w["r_bot"] + (w["r_top"] - w["r_bot"]) * t ** 0.7
        phi = np.arctan2(np.float32(w["side"]) * dx, dy)
        phi1 = w["phi1_bot"] + (w["phi1_top"] - w["phi1_bot"]) * t ** 0.5
        sdf = np.abs(r - R) - np.float32(w["thick"] / 2)
        sdf = np.maximum(sdf, (np.float32(w["phi0"]) - phi) * R)
        sdf = np.maximum(sdf, (phi - phi1) * R)
        zz = z.astype(np.float32)[:, None, None]
        # the crest is rounded: it sinks towards both ends of the wing
        mid = 0.5 * (w["phi0"] + w["phi1_top"])
        crest = np.float32(w["z_top"]) - 12.0 * ((phi - mid) / (w["phi1_top"] - w["phi0"])) ** 2 * 4.0
        sdf = np.maximum(sdf, zz - crest)
        sdf = np.maximum(sdf, np.float32(w["z_bot"]) - zz)
        m = sdf < h
        if not m.any():
            continue
        inner = np.clip(0.5 - (sdf + 1.4) / h, 0.0, 1.0)
        core = marrow + 40.0 * sample_texture(tex, x[None, None, :], y[None, :, None], z[:, None, None])
        hu = np.float32(cortical) + (core - np.float32(cortical)) * inner
        _paint(vol[box], sdf, h, hu.astype(np.float32))


# --------------------------------------------------------------------------------------------
# soft tissue: body outline, fat, muscle, lungs, aorta, table, bowel gas
# --------------------------------------------------------------------------------------------
def render_soft_tissue(st: SoftTissue, grid: Grid, vol: np.ndarray, slab: int = 16) -> None:
    x = grid.axis(0).astype(np.float32)
    y = grid.axis(1).astype(np.float32)
    z = grid.axis(2)
    zk = st.z_knots
    ip = lambda arr, zz: np.interp(zz, zk, arr).astype(np.float32)  # noqa: E731
    # diaphragm domes: a 2-D field of the z below which there is no lung
    ccx0 = float(np.interp(st.lung_bottom_r, zk, st.spine_x))
    cax0 = float(np.max(st.cage_ax)) if np.max(st.cage_ax) > 0 else 1.0
    cay0 = float(np.max(st.cage_ay)) if np.max(st.cage_ay) > 0 else 1.0
    ccy0 = float(np.interp(st.lung_bottom_r, zk, st.cage_cy))
    dome = np.full((len(y), len(x)), np.inf, dtype=np.float32)
    for side, base in ((1.0, st.lung_bottom_l), (-1.0, st.lung_bottom_r)):
        xs = ((x[None, :] - (ccx0 + side * 0.45 * cax0)) / (0.6 * cax0)) ** 2
        ys = ((y[:, None] - (ccy0 - 0.1 * cay0)) / (0.95 * cay0)) ** 2
        f = base + 55.0 * np.clip(1.0 - xs - ys, 0.0, None) ** 0.5 - 55.0
        sel = (x[None, :] - ccx0) * side >= 0
        dome = np.where(sel, f, dome)
    lung_zmin = min(st.lung_bottom_l, st.lung_bottom_r) - 60.0
    for z0 in range(0, vol.shape[0], slab):
        zz = z[z0:z0 + slab]
        n = len(zz)
        cx, cy = ip(st.body_cx, zz)[:, None, None], ip(st.body_cy, zz)[:, None, None]
        bx, by = ip(st.body_ax, zz)[:, None, None], ip(st.body_ay, zz)[:, None, None]
        qx = ((x[None, None, :] - cx) / bx) ** 2
        qy = ((y[None, :, None] - cy) / by) ** 2
        out = vol[z0:z0 + n]
        out[...] = AIR_HU
        q = qx + qy
        out[q <= 1.0] = st.fat_hu
        f = np.float32(st.fat_mm)
        qi = (((x[None, None, :] - cx) / np.maximum(bx - f, 5)) ** 2
              + ((y[None, :, None] - cy) / np.maximum(by - f, 5)) ** 2)
        sy = ip(st.spine_y, zz)[:, None, None]
        sdp = ip(st.spine_depth, zz)[:, None, None]
        sxs = ip(st.spine_x, zz)[:, None, None]
        out[qi <= 1.0] = st.organ_hu
        # body wall muscles (a ring inside the fat) and the paraspinal muscles behind the spine
        wall = 9.0 + 0.05 * f
        qw = ((x[None, None, :] - cx) / np.maximum(bx - f - wall, 4)) ** 2 + \
            ((y[None, :, None] - cy) / np.maximum(by - f - wall, 4)) ** 2
        out[(qi <= 1.0) & (qw > 1.0)] = st.muscle_hu
        qp = ((x[None, None, :] - sxs) / (1.3 * sdp + 22.0)) ** 2 + \
            ((y[None, :, None] - (sy + 0.5 * sdp + 40.0)) / (0.5 * sdp + 30.0)) ** 2
        out[(qi <= 1.0) & (qp <= 1.0)] = st.muscle_hu
        liver = st.extras.get("liver")
        if liver is not None:
            kl = np.nonzero((zz < liver["z_top"]) & (zz > liver["z_bot"]))[0]
            if len(kl):
                zl = zz[kl]
                lx = ip(st.spine_x, zl)[:, None, None] + np.float32(liver["dx"])
                ly = ip(st.spine_y, zl)[:, None, None] + np.float32(liver["dy"])
                # the liver tapers towards its lower tip
                t = np.clip((zl - liver["z_bot"]) / 60.0, 0.2, 1.0).astype(np.float32)[:, None, None]
                m = (((x[None, None, :] - lx) / (liver["ax"] * t)) ** 2
                     + ((y[None, :, None] - ly) / (liver["ay"] * t)) ** 2) <= 1.0
                m &= qi[kl] <= 1.0
                sub = out[kl]
                sub[m] = liver["hu"]
                out[kl] = sub
        # lungs
        in_lung = (zz > lung_zmin) & (zz < st.lung_top)
        if in_lung.any() and np.max(st.cage_ax) > 0:
            ks = np.nonzero(in_lung)[0]
            zl = zz[ks]
            taper = np.sqrt(np.clip((st.lung_top - zl) / 45.0, 0.0, 1.0)).astype(np.float32)
            cax = ip(st.cage_ax, zl) * taper
            cay = ip(st.cage_ay, zl) * (0.4 + 0.6 * taper)
            ccy = ip(st.cage_cy, zl)
            scx = ip(st.spine_x, zl)
            scy = ip(st.spine_y, zl)
            sd = ip(st.spine_depth, zl)
            ok = cax > 1.0
            if ok.any():
                ks, cax, cay, ccy, scx, scy, sd, zl = (a[ok] for a in (ks, cax, cay, ccy, scx, scy, sd, zl))
                xa = x[None, None, :] - scx[:, None, None]
                ya = y[None, :, None]
                cage = (xa / cax[:, None, None]) ** 2 + ((ya - ccy[:, None, None]) / cay[:, None, None]) ** 2 <= 1.0
                sd3, scy3 = sd[:, None, None], scy[:, None, None]
                med = (np.abs(xa - 6.0) < (22.0 + 0.25 * sd3)) & (ya < scy3 + 0.3 * sd3)
                spine = (xa / (0.9 * sd3 + 14.0)) ** 2 + ((ya - scy3) / (0.5 * sd3 + 14.0)) ** 2 <= 1.0
                # no lung behind the vertebral bodies near the midline (canal, laminae, muscles)
                spine |= (np.abs(xa) < 0.75 * sd3 + 16.0) & (ya > scy3 - 0.3 * sd3)
                heart_c = ccy - 0.3 * cay
                heart = ((xa - 0.2 * cax[:, None, None]) / (0.42 * cax[:, None, None])) ** 2 + \
                    ((ya - heart_c[:, None, None]) / (0.42 * cay[:, None, None])) ** 2 <= 1.0
                heart &= (zl[:, None, None] < st.lung_top - 0.45 * (st.lung_top - st.lung_bottom_r))
                above = zl[:, None, None] > dome[None]
                lung = cage & ~med & ~spine & ~heart & above & (qi[ks] <= 1.0)
                sub = out[ks]
                sub[lung] = -850.0
                out[ks] = sub
    _small_organs(st, grid, vol, x, y, z)
    if st.table:
        # a (slightly curved) carbon-fibre table top: two thin dense skins around a foam core
        t = st.table
        xc = 0.5 * (t["x0"] + t["x1"])
        lift = t.get("curve", 0.0) * (x - xc) ** 2              # per column
        sy_ = grid.index_slice(1, t["y"] - float(lift.max()) - 1.0, t["y"] + t["thick"] + 1.0)
        if sy_.stop > sy_.start:
            yr = y[sy_][:, None] - (t["y"] - lift[None, :])      # depth below the top skin
            inx = ((x >= t["x0"]) & (x <= t["x1"]))[None, :]
            skin = inx & (((yr >= 0) & (yr < 2.0)) | ((yr >= t["thick"] - 2.0) & (yr < t["thick"])))
            foam = inx & (yr >= 2.0) & (yr < t["thick"] - 2.0)
            sub = vol[:, sy_, :]
            sub[:, foam] = -750.0
            sub[:, skin] = 250.0
    for gx, gy, gz, gr in st.gas:
        c = np.array([gx, gy, gz])
        box = grid.box(c - gr - 1, c + gr + 1)
        if box is None:
            continue
        xs, ys, zs = _axes(grid, box)
        d = np.sqrt(((xs - gx)[None, None, :]) ** 2 + ((ys - gy)[None, :, None]) ** 2
                    + ((zs - gz)[:, None, None] * 1.3) ** 2)
        vb = vol[box]
        m = (d <= gr) & (vb > -200) & (vb < 150)
        vb[m] = -900.0


def _ellipse(out2d: np.ndarray, grid: Grid, x, y, cx, cy, ax, ay, hu, only=None) -> None:
    """Paint an axis-aligned ellipse into one slice, touching only its bounding box."""
    if ax <= 0.5 or ay <= 0.5:
        return
    bx = grid.index_slice(0, cx - ax, cx + ax)
    by = grid.index_slice(1, cy - ay, cy + ay)
    if bx.stop <= bx.start or by.stop <= by.start:
        return
    m = ((x[bx][None, :] - cx) / ax) ** 2 + ((y[by][:, None] - cy) / ay) ** 2 <= 1.0
    sub = out2d[by, bx]
    if only is not None:
        m &= only(sub)
    sub[m] = hu


def _small_organs(st: SoftTissue, grid: Grid, vol: np.ndarray, x, y, z) -> None:
    """Retroperitoneal fat, psoas, kidneys (with perirenal fat), aorta and trachea, slice by slice."""
    zk = st.z_knots
    ex = st.extras
    soft = lambda a: (a > -300) & (a < 120)  # noqa: E731  (inside the body, not lung/bone)
    for k, zc in enumerate(z):
        sx = float(np.interp(zc, zk, st.spine_x))
        sy = float(np.interp(zc, zk, st.spine_y))
        sd = float(np.interp(zc, zk, st.spine_depth))
        sl = vol[k]
        rf = ex.get("retro_fat")
        if rf and rf["z_bot"] < zc < rf["z_top"]:
            t = float(np.sin(np.pi * (zc - rf["z_bot"]) / (rf["z_top"] - rf["z_bot"]))) ** 0.5
            _ellipse(sl, grid, x, y, sx, sy - 0.1 * sd, rf["ax"] * t, rf["ay"] * (0.5 + 0.5 * t), st.fat_hu,
                     only=lambda a: np.abs(a - st.organ_hu) < 0.5)
        ps = ex.get("psoas")
        if ps and ps["z_bot"] < zc < ps["z_top"]:
            f = (ps["z_top"] - zc) / max(ps["z_top"] - ps["z_bot"], 1.0)
            r = ps["r_top"] + (ps["r_bot"] - ps["r_top"]) * np.sin(np.pi / 2 * min(f * 1.3, 1.0))
            for sg in (-1.0, 1.0):
                cx = sx + sg * (0.62 * sd + 0.8 * r)
                _ellipse(sl, grid, x, y, cx, sy - 0.05 * sd, r, 0.85 * r, ps["hu"], only=soft)
        for kd in ex.get("kidneys", ()):
            u = (zc - kd["zc"]) / kd["dz"]
            if abs(u) < 1.0:
                f = float(np.sqrt(1.0 - u * u))
                cx, cy = sx + kd["dx"], sy + kd["dy"]
                _ellipse(sl, grid, x, y, cx, cy, kd["ax"] * f + 7.0, kd["ay"] * f + 6.0, st.fat_hu, only=soft)
                _ellipse(sl, grid, x, y, cx, cy, kd["ax"] * f, kd["ay"] * f, kd["hu"], only=soft)
        if st.aorta_bottom < zc < st.aorta_top:
            r = st.aorta_r
            _ellipse(sl, grid, x, y, sx + 0.45 * sd + 4.0, sy - 0.5 * sd - r - 2.0, r, r, st.aorta_hu,
                     only=lambda a: a > -300)
        tr = ex.get("trachea")
        if tr and tr["z_bot"] < zc < tr["z_top"]:
            cy = sy - 0.5 * sd - 14.0 - tr["r"]
            _ellipse(sl, grid, x, y, sx, cy, tr["r"] + 1.5, tr["r"] + 1.5, 90.0, only=lambda a: a > -300)
            _ellipse(sl, grid, x, y, sx, cy, tr["r"], tr["r"], -980.0)


# --------------------------------------------------------------------------------------------
# metal: screws and their streaks
# --------------------------------------------------------------------------------------------
def render_screws(screws, grid: Grid, vol: np.ndarray, h: float, streak_amp: float, rng_seed: int) -> None:
    if not screws:
        return
    for s in screws:
        render_capsule(grid, vol, s["start"], s["end"], s["radius"], h, 3200.0, None)
    # streaks: radial bright/dark lines around the metal in each axial slice that crosses it
    z = grid.axis(2)
    x = grid.axis(0).astype(np.float32)
    y = grid.axis(1).astype(np.float32)
    zmin = min(min(s["start"][2], s["end"][2]) for s in screws) - 2
    zmax = max(max(s["start"][2], s["end"][2]) for s in screws) + 2
    rng = np.random.default_rng([rng_seed, 11])
    nlines = int(rng.integers(6, 14))
    angles = rng.uniform(0, np.pi, nlines)          # a streak runs through the metal both ways
    amps = rng.uniform(0.3, 1.0, nlines) * rng.choice([-1.0, 1.0], nlines)
    widths = rng.uniform(0.015, 0.04, nlines)       # radians
    for k in np.nonzero((z >= zmin) & (z <= zmax))[0]:
        pts = []
        for s in screws:
            a, b = s["start"], s["end"]
            if (z[k] - a[2]) * (z[k] - b[2]) <= 0 or abs(a[2] - b[2]) < 1e-6:
                t = 0.5 if abs(a[2] - b[2]) < 1e-6 else (z[k] - a[2]) / (b[2] - a[2])
                pts.append(a + t * (b - a))
        if not pts:
            continue
        c = np.mean(pts, axis=0)
        dx = x[None, :] - np.float32(c[0])
        dy = y[:, None] - np.float32(c[1])
        r = np.sqrt(dx * dx + dy * dy) + 1.0
        th = np.arctan2(dy, dx)
        pat = np.zeros(r.shape, np.float32)
        for ang, amp, w in zip(angles, amps, widths):
            d = np.abs(((th - ang) + np.pi / 2) % np.pi - np.pi / 2)  # angular distance to the line
            pat += np.float32(amp) * np.exp(-(d / np.float32(w)) ** 2)
        pat *= np.exp(-r / 60.0) * np.clip((r - 6.0) / 6.0, 0, 1) * np.float32(streak_amp)
        if len(pts) >= 2:
            # the dark band between two metal objects (photon starvation)
            p0, p1 = pts[0][:2], pts[1][:2]
            dv = p1 - p0
            L = float(np.hypot(*dv)) or 1.0
            tt = np.clip((dx + np.float32(c[0] - p0[0])) * dv[0] / L ** 2
                         + (dy + np.float32(c[1] - p0[1])) * dv[1] / L ** 2, 0, 1)
            ex = dx + np.float32(c[0] - p0[0]) - tt * dv[0]
            ey = dy + np.float32(c[1] - p0[1]) - tt * dv[1]
            pat -= np.float32(0.8 * streak_amp) * np.exp(-(ex * ex + ey * ey) / 30.0)
        sl = vol[k]
        body = sl > -500
        sl[body] += pat[body]


# --------------------------------------------------------------------------------------------
# the whole scene
# --------------------------------------------------------------------------------------------
def render(anatomy: Anatomy, grid: Grid, spinal_labels: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """HU (float32, noise-free, unblurred) and labels (uint8) of the scene on ``grid``.

    Returns also ``boxes``: label -> grid box of that vertebra (for fast centroids).
    """
    vol = np.empty(grid.shape, dtype=np.float32)
    lab = np.zeros(grid.shape, dtype=np.uint8)
    h = float(np.clip(grid.voxel_mm, 0.4, 2.5))
    tex = make_texture(anatomy.texture_seed)
    render_soft_tissue(anatomy.soft, grid, vol)
    verts = anatomy.vertebrae
    for a, b in zip(verts[:-1], verts[1:]):
        if a.name == "C1" or (a.sacrum and b.sacrum):
            continue
        render_disc(a, b, grid, vol, h)
    cort = float(np.mean([v.cortical_hu for v in verts])) * 0.9
    marrow = float(np.mean([v.cancellous_hu for v in verts]))
    for rib in anatomy.ribs:
        render_rib(rib, grid, vol, h, tex, cort, marrow)
    render_pelvis(anatomy.pelvis, grid, vol, h, tex, cort, marrow)
    boxes = {}
    for v in verts:
        box = render_vertebra(v, grid, vol, lab, tex, h, write_label=spinal_labels and not v.sacrum)
        if box is not None and not v.sacrum:
            boxes[v.label] = box
    render_screws(anatomy.screws, grid, vol, h, 450.0, anatomy.texture_seed)
    return vol, lab, boxes
