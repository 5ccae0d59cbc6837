"""Label map -> CT-like HU image with a random appearance (SynthSeg-style).

The label map fixes the anatomy; everything else is drawn anew for every volume from the
``numpy.random.Generator`` passed in (the same seed gives the same volume, bit for bit):

- bone: a cortical shell (the outer 1-2 mm of each vertebra, 400-1500 HU) around cancellous bone
  (80-400 HU, or 20-120 HU for an osteoporotic case), posterior elements a little denser,
  band-pass trabecular texture; vertebrae share the case's densities within +-15 %, or (one case
  in five) each draws its own, so that no density identifies a level;
- intervertebral discs (40-120 HU) in the space between consecutive bodies, column by column
  along the spine, so that a fracture's lost height becomes disc space as it does in a patient;
- the scene (:mod:`pipeline.synthesis.scene`): sacrum, iliac wings, ribs, aorta and vena cava
  (contrast media or not), skin, subcutaneous fat, table, lungs, bowel gas, metal, the dural sac
  of a CT myelogram (contrast in the spinal canal);
- soft tissue: a random mixture of fat (-150..-60 HU) and muscle (20..80 HU) in low-frequency
  blobs, muscle-rich around the spine;
- acquisition: a multiplicative bias on the attenuation (cupping, beam hardening), Gaussian blur
  (0-1.2 mm), slice thickness 1-3.5 mm (blur along z, resampling to the thick slices and back),
  correlated Gaussian noise (5-60 HU), a global HU gain (0.8-1.2) and offset (+-60 HU).

The image keeps the label map's grid, so the labels stay the exact ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.synthesis.geometry import (
    BODY_SUBREGIONS,
    as_label_image,
    label_boxes,
    level_sorted,
    on_grid_of,
    pseudo_subregions,
)
from pipeline.synthesis.raster import Grid, paint, solid_values, tube_values, values
from pipeline.synthesis.scene import Scene, SceneOptions, Streaks, plan_scene

AIR_HU = -1000.0
HU_FLOOR, HU_CEIL = -1024.0, 8192.0
#: Side of the periodic trabecular texture tile (voxels).
TEXTURE_N = 48


@dataclass(frozen=True)
class RenderOptions:
    """Ranges of the random appearance (HU, mm)."""

    cortical_hu: tuple[float, float] = (400.0, 1500.0)
    cancellous_hu: tuple[float, float] = (80.0, 400.0)
    osteoporotic_probability: float = 0.3
    osteoporotic_hu: tuple[float, float] = (20.0, 120.0)
    independent_probability: float = 0.2
    cortex_mm: tuple[float, float] = (1.0, 2.0)
    posterior_boost_hu: tuple[float, float] = (0.0, 150.0)
    texture_hu: tuple[float, float] = (0.0, 120.0)
    disc_hu: tuple[float, float] = (40.0, 120.0)
    disc_max_gap_mm: float = 30.0
    end_disc_mm: tuple[float, float] = (4.0, 10.0)
    fat_hu: tuple[float, float] = (-150.0, -60.0)
    muscle_hu: tuple[float, float] = (20.0, 80.0)
    air_hu: tuple[float, float] = (-1000.0, -700.0)
    gain: tuple[float, float] = (0.8, 1.2)
    offset_hu: float = 60.0
    bias_strength: float = 0.06
    blur_mm: tuple[float, float] = (0.0, 1.2)
    thickness_mm: tuple[float, float] = (1.0, 3.5)
    noise_hu: tuple[float, float] = (5.0, 60.0)
    scene: SceneOptions = field(default_factory=SceneOptions)


@dataclass(frozen=True)
class Appearance:
    """The case-level draws of a rendering (what a test or a log may want to know)."""

    cortical_hu: float
    cancellous_hu: float
    independent: bool
    cortex_mm: float
    posterior_boost_hu: float
    texture_hu: float
    disc_hu: float
    fat_hu: float
    muscle_hu: float
    gain: float
    offset_hu: float
    blur_mm: float
    thickness_mm: float
    noise_hu: float


def draw_appearance(rng: np.random.Generator, o: RenderOptions = RenderOptions()) -> Appearance:
    """The case-level random appearance."""
    u = rng.uniform
    porotic = rng.random() < o.osteoporotic_probability
    canc = float(u(*o.osteoporotic_hu) if porotic else u(*o.cancellous_hu))
    cort = max(float(u(*o.cortical_hu)), canc + 150.0)
    return Appearance(cort, canc, bool(rng.random() < o.independent_probability),
                      float(u(*o.cortex_mm)), float(u(*o.posterior_boost_hu)),
                      float(u(*o.texture_hu)), float(u(*o.disc_hu)), float(u(*o.fat_hu)),
                      float(u(*o.muscle_hu)), float(u(*o.gain)),
                      float(u(-o.offset_hu, o.offset_hu)), float(u(*o.blur_mm)),
                      float(u(*o.thickness_mm)), float(u(*o.noise_hu)))


# --------------------------------------------------------------------------------------------
# random fields
# --------------------------------------------------------------------------------------------
def smooth_field(ref: sitk.Image, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance random field on ``ref``'s grid with features of ``scale_mm``:
    normal values on a lattice of ``scale_mm``, B-spline interpolated onto a grid of a quarter
    of that spacing, then linearly onto ``ref`` (a smooth field loses nothing to the linear
    step, and B-spline interpolation onto every voxel would cost seconds)."""
    size = np.array(ref.GetSize())
    sp = np.array(ref.GetSpacing())
    origin = np.array(ref.GetOrigin())
    n = np.ceil((size - 1) * sp / scale_mm).astype(int) + 5
    coarse = sitk.GetImageFromArray(rng.standard_normal(n[::-1]).astype(np.float32))
    coarse.SetSpacing([float(scale_mm)] * 3)
    coarse.SetOrigin([float(v) for v in origin - 2 * scale_mm])
    coarse.SetDirection(ref.GetDirection())
    step = np.maximum(sp, scale_mm / 4.0)
    mid = sitk.Image([int(v) for v in np.ceil((size - 1) * sp / step) + 2], sitk.sitkFloat32)
    mid.SetSpacing([float(v) for v in step])
    mid.SetOrigin([float(v) for v in origin])
    mid.SetDirection(ref.GetDirection())
    mid = sitk.Resample(coarse, mid, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    out = sitk.GetArrayFromImage(sitk.Resample(mid, ref, sitk.Transform(), sitk.sitkLinear,
                                               0.0, sitk.sitkFloat32, True))
    return (out - out.mean()) / (out.std() + 1e-6)


def texture_tile(rng: np.random.Generator) -> np.ndarray:
    """Periodic band-pass noise (unit variance): trabecular-like texture, tiled over the bone."""
    t = rng.standard_normal((TEXTURE_N,) * 3).astype(np.float32)
    band = (ndi.gaussian_filter(t, rng.uniform(0.6, 1.2), mode="wrap")
            - ndi.gaussian_filter(t, rng.uniform(2.0, 4.0), mode="wrap"))
    return band / (band.std() + 1e-6)


# --------------------------------------------------------------------------------------------
# soft tissue and the scene's non-bone structures
# --------------------------------------------------------------------------------------------
def _spine_centre(grid: Grid, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Spine centre (x, y) in every axial slice, ``[nz, 1, 1]`` each."""
    z = grid.axis(2)
    if len(scene.spine) == 0:
        cx = np.full_like(z, grid.axis(0).mean())
        cy = np.full_like(z, grid.axis(1).mean())
    else:
        s = scene.spine[np.argsort(scene.spine[:, 2])]
        cx, cy = np.interp(z, s[:, 2], s[:, 0]), np.interp(z, s[:, 2], s[:, 1])
    return cx[:, None, None].astype(np.float32), cy[:, None, None].astype(np.float32)


def soft_tissue(ref: sitk.Image, grid: Grid, scene: Scene, app: Appearance,
                rng: np.random.Generator, o: RenderOptions) -> np.ndarray:
    """Background HU: fat/muscle blobs, muscle around the spine, skin outline, table, lungs,
    bowel gas and vessels."""
    x = grid.axis(0)[None, None, :].astype(np.float32)
    y = grid.axis(1)[None, :, None].astype(np.float32)
    z = grid.axis(2)[:, None, None].astype(np.float32)
    cx, cy = _spine_centre(grid, scene)
    r2 = (x - cx) ** 2 + (y - cy) ** 2
    near = np.exp(-r2 / np.float32(rng.uniform(40, 75) ** 2))
    blobs = smooth_field(ref, rng, rng.uniform(20, 50))
    frac = np.clip(0.5 + (blobs - rng.uniform(-0.8, 0.8)) * rng.uniform(0.8, 3.0), 0, 1)
    frac = np.maximum(frac, near)
    vol = (app.fat_hu + (app.muscle_hu - app.fat_hu) * frac).astype(np.float32)
    del frac, near, r2
    vol += np.float32(rng.uniform(3, 15)) * smooth_field(ref, rng, rng.uniform(8, 20))

    inside = np.ones(vol.shape, bool)
    ol = scene.outline
    if ol is not None:
        ex, ey = cx + ol.offset_x, cy + ol.posterior_mm - ol.half_y
        rho = np.sqrt(((x - ex) / ol.half_x) ** 2 + ((y - ey) / ol.half_y) ** 2)
        inside = rho <= 1.0
        depth = (1.0 - rho) * min(ol.half_x, ol.half_y)     # ~ distance under the skin
        vol[inside & (depth < ol.fat_mm)] = app.fat_hu
        vol[~inside] = AIR_HU + 5.0 * rng.standard_normal()
        if ol.table_thickness is not None:
            y0 = cy + ol.posterior_mm + ol.table_gap
            table = (y >= y0) & (y <= y0 + ol.table_thickness)
            vol[np.broadcast_to(table, vol.shape)] = ol.table_hu
        wall = depth > ol.fat_mm + 12.0
    else:
        wall = inside
    lg = scene.lungs
    if lg is not None:
        taper = (np.clip((z - lg.z_bottom) / 40.0, 0.0, 1.0)
                 * np.clip((lg.z_top - z) / 40.0, 0.0, 1.0))
        lungs = np.zeros(vol.shape, bool)
        for side in (1.0, -1.0):
            lx = cx + side * (lg.medial_mm + lg.half_x)
            q = ((x - lx) / lg.half_x) ** 2 + ((y - cy - lg.offset_y) / lg.half_y) ** 2
            lungs |= q < taper ** 2
        lungs &= wall
        vol[lungs] = lg.hu + 30.0 * blobs[lungs]
    if scene.gas:
        field_ = smooth_field(ref, rng, rng.uniform(8, 18))
        gas = (field_ > rng.uniform(1.2, 2.0)) & (y < cy - rng.uniform(35, 60)) & wall
        vol[gas] = rng.uniform(*o.air_hu)
    for tube in scene.vessels + ([scene.theca] if scene.theca is not None else []):
        got = tube_values(grid, tube)
        if got is not None:
            box, vals = got
            vals = np.where(inside[box], vals, np.nan)
            paint(vol, (box, vals))
    return vol


# --------------------------------------------------------------------------------------------
# discs and bone
# --------------------------------------------------------------------------------------------
def _columns(body: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (y, x) column of a box: any body voxel, lowest and highest z index of the body."""
    anyb = body.any(axis=0)
    low = np.argmax(body, axis=0)
    high = body.shape[0] - 1 - np.argmax(body[::-1], axis=0)
    return anyb, low, high


def disc_masks(lab: np.ndarray, bodies: np.ndarray, grid: Grid, max_gap_mm: float,
               end_mm: tuple[float, float] | None = None, ends: tuple[int, ...] = (),
               sacrum_below: bool = False
               ) -> list[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """Disc space between consecutive vertebral bodies (level order), as ``(box, mask)``.

    Column by column along z (the posed spine runs along z within ~25 deg): the voxels between
    the lowest voxel of the upper body and the highest of the lower one, where both exist and
    are at most ``max_gap_mm`` apart, minus bone. ``end_mm`` = (thickness above the top body,
    below the bottom body) adds the discs beyond the ends of the labelled spine, ``ends`` =
    (first, last) level of the whole spine (a crop's end vertebrae are not the spine's).
    """
    present = level_sorted(np.unique(lab))
    boxes = label_boxes(np.where(bodies, lab, 0))
    present = [p for p in present if p in boxes]
    sz = grid.spacing[2]
    out = []
    zi_all = np.arange(lab.shape[0])
    for upper, lower in zip(present[:-1], present[1:]):
        bu, bl = boxes[upper], boxes[lower]
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(bu, bl))
        sub_lab, sub_body = lab[box], bodies[box]
        any_u, low_u, _ = _columns(sub_body & (sub_lab == upper))
        any_l, _, high_l = _columns(sub_body & (sub_lab == lower))
        ok = any_u & any_l & (low_u > high_l + 1) & ((low_u - high_l - 1) * sz <= max_gap_mm)
        zi = zi_all[box[0]][:, None, None] - box[0].start
        disc = ok[None] & (zi > high_l[None]) & (zi < low_u[None]) & (sub_lab == 0)
        disc = ndi.binary_closing(disc, iterations=1) & (sub_lab == 0)
        out.append((box, disc))
    if end_mm is not None and present and ends:
        for label, up in ((ends[0], True), (ends[-1], False)):
            if label not in boxes or (not up and sacrum_below):
                continue
            n = int(round((end_mm[0] if up else end_mm[1]) / sz))
            b = boxes[label]
            lo = max(0, b[0].start - (0 if up else n))
            hi = min(lab.shape[0], b[0].stop + (n if up else 0))
            box = (slice(lo, hi), b[1], b[2])
            body = bodies[box] & (lab[box] == label)
            anyb, low, high = _columns(body)
            zi = np.arange(hi - lo)[:, None, None]
            if up:
                disc = anyb[None] & (zi > high[None]) & (zi <= high[None] + n)
            else:
                disc = anyb[None] & (zi < low[None]) & (zi >= low[None] - n)
            out.append((box, disc & (lab[box] == 0)))
    return out


def _vertebra_hu(rng: np.random.Generator, app: Appearance, o: RenderOptions
                 ) -> tuple[float, float]:
    """(cortical, cancellous) HU of one vertebra: the case's +-15 %, or its own draw."""
    if app.independent:
        canc = float(rng.uniform(*o.cancellous_hu))
        return max(float(rng.uniform(*o.cortical_hu)), canc + 150.0), canc
    canc = app.cancellous_hu * float(rng.uniform(0.85, 1.15))
    return max(app.cortical_hu * float(rng.uniform(0.85, 1.15)), canc + 150.0), canc


def paint_vertebrae(vol: np.ndarray, lab: np.ndarray, sub: np.ndarray, grid: Grid,
                    rng: np.random.Generator, app: Appearance, o: RenderOptions,
                    cancellous: np.ndarray) -> None:
    """Cortical shell (voxels within ``cortex_mm`` of the outside) and cancellous interior of
    every vertebra, in place; ``cancellous`` is set where the texture goes."""
    boxes = label_boxes(lab)
    sampling = tuple(grid.spacing[::-1])
    levels = level_sorted(boxes)
    for label in levels + sorted(k for k in boxes if k not in levels):   # e.g. a sacrum label
        cort, canc = _vertebra_hu(rng, app, o)
        b = boxes[label]
        box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1))
                    for s, n in zip(b, lab.shape))
        m = lab[box] == label
        d = ndi.distance_transform_edt(m, sampling=sampling)
        interior = d > app.cortex_mm
        body = np.isin(sub[box], BODY_SUBREGIONS)
        vals = np.where(interior, np.where(body, canc, min(canc + app.posterior_boost_hu,
                                                           cort)), cort)
        region = vol[box]
        region[m] = vals[m]
        cancellous[box] |= m & interior


def _streaks(vol: np.ndarray, grid: Grid, s: Streaks) -> None:
    """Bright and dark lines through a metal object in the axial slices around it."""
    z = grid.axis(2)
    ks = np.nonzero((z >= s.z_range[0]) & (z <= s.z_range[1]))[0]
    if not len(ks):
        return
    x = grid.axis(0)[None, :] - s.centre[0]
    y = grid.axis(1)[:, None] - s.centre[1]
    pattern = np.zeros((len(grid.axis(1)), len(grid.axis(0))), np.float32)
    for ang, amp in zip(s.angles, s.amplitudes):
        across = -x * np.sin(ang) + y * np.cos(ang)
        along = np.abs(x * np.cos(ang) + y * np.sin(ang))
        pattern += (amp * np.exp(-0.5 * (across / s.width_mm) ** 2)
                    * np.exp(-along / 150.0)).astype(np.float32)
    mid = 0.5 * (s.z_range[0] + s.z_range[1])
    half = 0.5 * (s.z_range[1] - s.z_range[0])
    for k in ks:
        vol[k] += pattern * np.float32(1.0 - abs(z[k] - mid) / (half + 1.0))


# --------------------------------------------------------------------------------------------
# acquisition
# --------------------------------------------------------------------------------------------
def _image(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, np.float32))
    img.CopyInformation(ref)
    return img


def acquire(vol: np.ndarray, ref: sitk.Image, rng: np.random.Generator, app: Appearance,
            o: RenderOptions) -> sitk.Image:
    """Bias field, blur, slice thickness, noise, global gain and offset; the HU image on
    ``ref``'s grid."""
    strength = rng.uniform(0.0, o.bias_strength)
    bias = np.exp(np.float32(strength) * smooth_field(ref, rng, rng.uniform(80, 160)))
    vol = (vol - AIR_HU) * bias + AIR_HU
    img = _image(vol, ref)
    sp = np.array(ref.GetSpacing())
    if app.blur_mm > 0.05:
        img = sitk.DiscreteGaussian(img, [app.blur_mm ** 2] * 3, 32, 0.01, True)
    thick = app.thickness_mm
    if thick > 1.05 * sp[2] and ref.GetSize()[2] > 2:
        img = sitk.DiscreteGaussian(img, [1e-6, 1e-6, (thick / np.sqrt(12.0)) ** 2], 32, 0.01,
                                    True)
        coarse_ref = sitk.Image([ref.GetSize()[0], ref.GetSize()[1],
                                 int(np.ceil((ref.GetSize()[2] - 1) * sp[2] / thick)) + 2],
                                sitk.sitkFloat32)
        coarse_ref.SetSpacing([sp[0], sp[1], thick])
        shift = rng.uniform(0.0, thick)                       # where the slices fall
        origin = np.array(ref.GetOrigin())
        coarse_ref.SetOrigin([origin[0], origin[1], origin[2] - shift])
        coarse_ref.SetDirection(ref.GetDirection())
        coarse = sitk.Resample(img, coarse_ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                               sitk.sitkFloat32, True)
        img = sitk.Resample(coarse, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32, True)
    vol = sitk.GetArrayFromImage(img)
    noise = _image(rng.standard_normal(vol.shape, dtype=np.float32), ref)
    corr = rng.uniform(0.4, 0.9)
    noise = sitk.GetArrayFromImage(sitk.DiscreteGaussian(noise, [corr ** 2] * 3, 32, 0.01, True))
    vol += noise * np.float32(app.noise_hu / (noise.std() + 1e-6))
    vol = vol * np.float32(app.gain) + np.float32(app.offset_hu)
    np.clip(vol, HU_FLOOR, HU_CEIL, out=vol)
    return _image(vol, ref)


# --------------------------------------------------------------------------------------------
# the whole rendering
# --------------------------------------------------------------------------------------------
def render_ct(labels: sitk.Image, rng: np.random.Generator,
              subregions: sitk.Image | None = None, options: RenderOptions = RenderOptions(),
              context: tuple[sitk.Image, sitk.Image] | None = None) -> sitk.Image:
    """A float32 HU image on the grid of ``labels`` (:func:`render_ct_scene` without its
    scene)."""
    return render_ct_scene(labels, rng, subregions, options, context)[0]


def render_ct_scene(labels: sitk.Image, rng: np.random.Generator,
                    subregions: sitk.Image | None = None,
                    options: RenderOptions = RenderOptions(),
                    context: tuple[sitk.Image, sitk.Image] | None = None
                    ) -> tuple[sitk.Image, Scene]:
    """A float32 HU image on the grid of ``labels`` (an axis-aligned grid, as posed), and the
    scene drawn around the labels (where the sacrum and the ribs are).

    ``subregions`` (VerSe 41-50) tells body from posterior elements; where absent the body is
    approximated (:func:`pipeline.synthesis.geometry.pseudo_subregions`). ``context`` = the
    whole case's (labels, subregions) when ``labels`` is a crop of it: the scene (sacrum, ribs,
    vessels, ...) is planned on the whole spine and drawn in the crop.
    """
    labels = as_label_image(labels)
    grid = Grid.of(labels)
    subregions = (pseudo_subregions(labels) if subregions is None
                  else on_grid_of(subregions, labels))
    lab = sitk.GetArrayFromImage(labels)
    sub = sitk.GetArrayFromImage(subregions)
    app = draw_appearance(rng, options)
    whole = context if context is not None else (labels, subregions)
    scene = plan_scene(whole[0], as_label_image(whole[1]), rng,
                       (app.cortical_hu, app.cancellous_hu), options.scene)
    vol = soft_tissue(labels, grid, scene, app, rng, options)

    bodies = (lab > 0) & np.isin(sub, BODY_SUBREGIONS)
    for box, disc in disc_masks(lab, bodies, grid, options.disc_max_gap_mm,
                                tuple(rng.uniform(*options.end_disc_mm, 2)), scene.ends,
                                scene.sacrum):
        hu = app.disc_hu * rng.uniform(0.85, 1.15)
        region = vol[box]
        region[disc] = hu + 8.0 * rng.standard_normal()
    for d in scene.discs:
        paint(vol, solid_values(grid, replace(d, hu=app.disc_hu * rng.uniform(0.85, 1.15))),
              protect=lab > 0)

    cancellous = np.zeros(vol.shape, bool)
    bone = lab > 0
    for piece in scene.bone:
        got = values(grid, piece)
        if got is not None:
            box, vals = got
            inner = vals == np.float32(piece.inner_hu) if piece.inner_hu is not None else None
            paint(vol, got, protect=bone)
            if inner is not None:
                cancellous[box] |= inner & ~bone[box]
    paint_vertebrae(vol, lab, sub, grid, rng, app, options, cancellous)

    tile = texture_tile(rng)
    zyx = np.nonzero(cancellous)
    vol[zyx] += np.float32(app.texture_hu) * tile[zyx[0] % TEXTURE_N, zyx[1] % TEXTURE_N,
                                                  zyx[2] % TEXTURE_N]
    for piece in scene.metal:
        paint(vol, values(grid, piece))
    for s in scene.streaks:
        _streaks(vol, grid, s)
    return acquire(vol, labels, rng, app, options), scene
