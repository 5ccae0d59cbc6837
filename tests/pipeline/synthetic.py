"""A tiny box-shaped spine for fast tests of the segmentation and keypoint code (not the phantom)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipeline.levels import level


def box_spine(levels=("L1", "L2", "L3"), spacing=(1.0, 1.0, 1.5), heights=None, seed=0):
    """CT (HU), labels and a gt dict: rectangular bodies 24 mm high, 36 deep, 40 wide, 8 mm discs,
    a posterior box (the arch) behind a 12 mm canal. ``heights``: optional (HA, HM, HP) per level
    (a wedge is drawn as a linear slope of the superior endplate)."""
    rng = np.random.default_rng(seed)
    nx, ny = int(120 / spacing[0]), int(120 / spacing[1])
    nz = int((len(levels) * 32 + 40) / spacing[2])
    ct = rng.normal(40, 15, (nz, ny, nx)).astype(np.float32)
    lab = np.zeros((nz, ny, nx), np.uint8)
    z = (np.arange(nz) + 0.5) * spacing[2]
    y = (np.arange(ny) + 0.5) * spacing[1]
    x = (np.arange(nx) + 0.5) * spacing[0]
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    verts = []
    top = nz * spacing[2] - 20
    for k, name in enumerate(levels):
        lv = level(name)
        ha, hm, hp = (heights or {}).get(name, (24.0, 24.0, 24.0))
        zc_bottom = top - 24 - k * 32
        y0, y1 = 30.0, 66.0  # body, anterior -> posterior (LPS +y posterior)
        frac = np.clip((Y - y0) / (y1 - y0), 0, 1)
        h_col = ha + (hp - ha) * frac
        body = (Y >= y0) & (Y < y1) & (np.abs(X - 60) < 20) & (Z >= zc_bottom) & (Z < zc_bottom + h_col)
        arch = (Y >= 78) & (Y < 96) & (np.abs(X - 60) < 8) & (Z >= zc_bottom + 4) & (Z < zc_bottom + 20)
        ped = (Y >= 66) & (Y < 78) & (np.abs(np.abs(X - 60) - 12) < 3) & (Z >= zc_bottom + 6) & (Z < zc_bottom + 18)
        m = body | arch | ped
        lab[m] = lv.label
        ct[m] = 250 + rng.normal(0, 15, m.sum())
        pts = np.stack([X[m], Y[m], Z[m]], 1)
        c = pts.mean(0)
        kp = {}
        for key, yy in (("A", y0 + 0.06 * 36), ("M", 48.0), ("P", y1 - 0.06 * 36)):
            hh = ha + (hp - ha) * (yy - y0) / (y1 - y0)
            kp[f"{key}1"] = [60.0, yy, zc_bottom + hh]
            kp[f"{key}2"] = [60.0, yy, zc_bottom]
        loss = 1 - min(ha, hm, hp) / max(ha, hm, hp)
        verts.append({"label": lv.label, "name": name, "centroid_mm": [float(v) for v in c], "partial": False,
                      "fractured": loss >= 0.2, "genant_grade": int(loss >= 0.2),
                      "morphology": "wedge" if loss >= 0.2 else "normal",
                      "heights_mm": {"anterior": ha, "middle": hm, "posterior": hp}, "keypoints_mm": kp})
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing(spacing)
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    return img, labels, {"seed": seed, "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4",
                         "vertebrae": verts}
