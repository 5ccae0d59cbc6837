"""Preview of a phantom: curved mid-sagittal and coronal reformats along the spine, bone window,
label outlines and level names (fractured levels in red with their Genant grade)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import map_coordinates

WINDOW = (400.0, 1800.0)  # bone window: level, width


def _palette(label: int) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.137) % 1.0, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _world_to_index(img: sitk.Image, pts: np.ndarray) -> np.ndarray:
    """(n, 3) LPS mm -> (3, n) continuous array indices in (k, j, i) order."""
    o = np.array(img.GetOrigin())
    s = np.array(img.GetSpacing())
    d = np.array(img.GetDirection()).reshape(3, 3)
    ijk = np.linalg.solve(d * s[None, :], (pts - o).T)  # (3, n) in (i, j, k)
    return ijk[::-1]


def _centerline(gt: dict, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vs = [v for v in gt["vertebrae"] if v.get("voxels", 1) > 0]
    if not vs:
        return np.zeros_like(z), np.zeros_like(z)
    def body_centre(v):
        kp = v.get("keypoints_mm")
        if kp:  # the middle of the body (the label centroid lies behind it, in the arch)
            return list(np.mean([kp["M1"], kp["M2"]], axis=0))
        return v["centroid_mm"]

    c = np.array(sorted((body_centre(v) for v in vs), key=lambda p: p[2]))
    if len(c) >= 4:  # smooth a little: centroids of partial end vertebrae wobble
        k = np.ones(3) / 3.0
        cx = np.convolve(np.pad(c[:, 0], 1, mode="edge"), k, mode="valid")
        cy = np.convolve(np.pad(c[:, 1], 1, mode="edge"), k, mode="valid")
    else:
        cx, cy = c[:, 0], c[:, 1]
    return np.interp(z, c[:, 2], cx), np.interp(z, c[:, 2], cy)


def _bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(img.GetSize())
    corners = np.array([[a, b, c] for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)], float)
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in corners])
    return pts.min(axis=0), pts.max(axis=0)


def reformats(ct: sitk.Image, labels: sitk.Image, gt: dict, step: float = 1.0):
    """Curved sagittal (rows z top-down, columns y anterior->posterior) and coronal (columns x
    patient right->left) planes through the spine centreline; HU and labels."""
    lo, hi = _bounds(ct)
    z = np.arange(hi[2], lo[2] - 1e-6, -step)
    sx, sy = _centerline(gt, z)
    # crop around the spine: 170 mm anterior to 120 mm posterior, 150 mm to each side
    my, mx = float(np.median(sy)), float(np.median(sx))
    y = np.arange(max(lo[1], my - 170.0), min(hi[1], my + 120.0) + 1e-6, step)
    x = np.arange(max(lo[0], mx - 150.0), min(hi[0], mx + 150.0) + 1e-6, step)
    arr = sitk.GetArrayViewFromImage(ct)
    lab = sitk.GetArrayViewFromImage(labels)
    out = {}
    for name, cols in (("sagittal", y), ("coronal", x)):
        Z, C = np.meshgrid(z, cols, indexing="ij")
        if name == "sagittal":
            pts = np.stack([np.repeat(sx[:, None], len(cols), 1), C, Z], axis=-1).reshape(-1, 3)
        else:
            pts = np.stack([C, np.repeat(sy[:, None], len(cols), 1), Z], axis=-1).reshape(-1, 3)
        idx = _world_to_index(ct, pts)
        hu = map_coordinates(arr, idx, order=1, mode="constant", cval=-1024.0).reshape(Z.shape)
        lb = map_coordinates(lab, idx, order=0, mode="constant", cval=0).reshape(Z.shape)
        out[name] = (hu, lb.astype(np.int32), z, cols)
    return out


def render_preview(ct: sitk.Image, labels: sitk.Image, gt: dict, height_px: int = 900) -> Image.Image:
    planes = reformats(ct, labels, gt)
    level, width = WINDOW
    tiles = []
    names = {v["label"]: v for v in gt["vertebrae"]}
    for key in ("sagittal", "coronal"):
        hu, lb, z, cols = planes[key]
        g = np.clip((hu - (level - width / 2)) / width, 0, 1) * 255
        rgb = np.repeat(g[..., None], 3, axis=2).astype(np.uint8)
        edge = np.zeros(lb.shape, bool)
        edge[:-1] |= lb[:-1] != lb[1:]
        edge[1:] |= lb[1:] != lb[:-1]
        edge[:, :-1] |= lb[:, :-1] != lb[:, 1:]
        edge[:, 1:] |= lb[:, 1:] != lb[:, :-1]
        edge &= lb > 0
        for lab in np.unique(lb[edge]):
            rgb[edge & (lb == lab)] = _palette(int(lab))
        im = Image.fromarray(rgb)
        scale = min(height_px / im.height, 3.0)
        im = im.resize((max(int(im.width * scale), 1), max(int(im.height * scale), 1)), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        font = ImageFont.load_default()
        # level names beside the vertebral bodies (their middle, from the gt keypoints)
        for lab in np.unique(lb):
            if lab == 0 or lab not in names:
                continue
            v = names[int(lab)]
            kp = v.get("keypoints_mm")
            if not kp:
                continue
            zc = 0.5 * (kp["M1"][2] + kp["M2"][2])
            r = (z[0] - zc) / (z[0] - z[-1] if len(z) > 1 else 1.0) * (len(z) - 1) * scale
            if key == "sagittal":
                front = min(kp["A1"][1], kp["A2"][1])
                c = (front - cols[0]) / (cols[1] - cols[0]) * scale
            else:
                c = float(np.max(np.nonzero(lb == lab)[1])) * scale
            text = v["name"]
            colour = (255, 255, 255)
            if v["fractured"]:
                text += f" G{v['genant_grade']} {v['morphology']}"
                colour = (255, 60, 60)
            if key == "sagittal":
                tw = d.textlength(text, font=font)
                d.text((max(c - tw - 6, 2), r - 5), text, fill=colour, font=font)
            else:
                d.text((min(c + 6, im.width - 40), r - 5), text, fill=colour, font=font)
        d.text((4, 4), f"{key} (curved)", fill=(255, 255, 0), font=font)
        tiles.append(im)
    W = sum(t.width for t in tiles) + 10 * (len(tiles) - 1)
    canvas = Image.new("RGB", (max(W, 520), max(t.height for t in tiles) + 22), (0, 0, 0))
    xoff = 0
    for t in tiles:
        canvas.paste(t, (xoff, 22))
        xoff += t.width + 10
    d = ImageDraw.Draw(canvas)
    sp = gt.get("grid", {}).get("spacing_mm", [0, 0, 0])
    feet_first = gt.get("grid", {}).get("direction", [1] * 9)[8] < 0
    d.text((4, 4), f"phantom seed {gt.get('seed')}  levels {gt['levels'][0]}-{gt['levels'][-1]}  "
                   f"spacing {sp[0]:.2f}x{sp[1]:.2f}x{sp[2]:.2f} mm  "
                   f"{'FF' if feet_first else 'HF'}  W{int(width)} L{int(level)}",
           fill=(200, 200, 200), font=ImageFont.load_default())
    return canvas


def write_preview(phantom, path: Path | str) -> Path:
    path = Path(path)
    render_preview(phantom.ct, phantom.labels, phantom.gt).save(path)
    return path
