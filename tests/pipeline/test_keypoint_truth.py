"""Reference Genant points from expert mask sections (pipeline.keypoints.truth)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.genant import MASK_EDGE_FRACTION, heights_from_mask
from pipeline.keypoints.truth import heights_from_points, keypoints_from_mask, mask_truth_heights


def _box(rows=(30, 70), cols=(20, 60), size=96):
    m = np.zeros((size, size), bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_box_body_gives_its_height_at_every_point():
    kp = keypoints_from_mask(_box(), 0.75)
    h = heights_from_points(kp, 0.75)
    assert (h.anterior, h.middle, h.posterior) == pytest.approx((30.0, 30.0, 30.0), abs=0.3)
    # rows run inferior -> superior, columns anterior -> posterior
    assert kp["A1"][0] > kp["A2"][0] and kp["A1"][1] < kp["M1"][1] < kp["P1"][1]


def test_wedge_body_gives_the_heights_at_the_anterior_middle_and_posterior_columns():
    m = np.zeros((96, 96), bool)
    c0, c1 = 20, 60                                   # 40 columns, anterior 20 -> posterior 40 px
    for c in range(c0, c1):
        m[30:30 + int(round(20 + (c - c0) * 20 / 39)), c] = True
    h = mask_truth_heights(m, 1.0)
    centre, half = (c0 + c1 - 1) / 2, (c1 - c0) / 2
    fs = (-MASK_EDGE_FRACTION, 0, MASK_EDGE_FRACTION)
    expect = [20 + (centre + f * half - c0) * 20 / 39 for f in fs]
    assert (h.anterior, h.middle, h.posterior) == pytest.approx(expect, abs=1.5)
    assert h.anterior < 0.65 * h.posterior


def test_concave_walls_and_a_rim_do_not_shorten_the_anterior_height():
    # A real body: waisted walls and an anterior osteophyte at the upper rim. Measured down the
    # corners' columns, the anterior height fell to the lip's thickness.
    m = _box()
    for r in range(34, 66):
        m[r, 20:23] = False                            # concave anterior wall
        m[r, 57:60] = False                            # concave posterior wall
    m[66:70, 16:20] = True                             # upper anterior osteophyte
    h = mask_truth_heights(m, 0.75)
    assert (h.anterior, h.middle, h.posterior) == pytest.approx((30.0, 30.0, 30.0), abs=1.0)
    hm = heights_from_mask(m.astype(float), 0.75)
    assert (hm.anterior, hm.middle, hm.posterior) == pytest.approx((30.0, 30.0, 30.0), abs=1.0)


def test_subregion_labels_pick_the_body_even_when_the_arch_touches_it():
    m = _box()
    m[40:60, 60:80] = True                             # posterior elements joined to the body
    sub = np.where(m, 41, 0)
    sub[_box()] = 50
    h = mask_truth_heights(m, 0.75, sub)
    assert (h.anterior, h.posterior) == pytest.approx((30.0, 30.0), abs=0.5)


def test_a_hole_in_the_segmentation_is_no_lost_height():
    m = _box().astype(float)
    m[40:60, 25:40] = 0.0                              # a segmentation hole inside the body
    h = heights_from_mask(m, 0.75)
    assert (h.anterior, h.middle, h.posterior) == pytest.approx((30.0, 30.0, 30.0), abs=0.5)


def test_expert_masks_of_normal_real_lumbar_bodies_give_normal_heights():
    from pipeline.realdata.pack import default_pack_dir, iter_pack_cases

    pack = default_pack_dir()
    if pack is None or not (pack / "sub-ctfu00003").exists():
        pytest.skip("../shared/data/real-spine is absent")
    import SimpleITK as sitk

    from pipeline.keypoints.plane import body_centre, sagittal_plane, spine_axes
    from pipeline.levels import BY_LABEL
    from pipeline.realdata.evaluation import axial_lps

    case = next(iter_pack_cases(pack, ["sub-ctfu00003"]))
    m = axial_lps(case.mask)
    labels = [22, 23, 24]                              # L3-L5, expert grade 0 (train side)
    cents = [case.centroids_mm[lab] for lab in labels]
    ups = spine_axes([BY_LABEL[lab].order for lab in labels], cents)
    for lab, c, up in zip(labels, cents, ups):
        fg = sitk.Cast(m == lab, sitk.sitkFloat32)
        plane = sagittal_plane(body_centre(fg, c, up), up, 96, 0.75)
        h = mask_truth_heights(plane.sample(fg, False, 0.0) > 0.5, 0.75)
        values = (h.anterior, h.middle, h.posterior)
        assert min(values) > 24.0 and 1 - min(values) / max(values) < 0.2
