"""Keypoints: the plane geometry, heatmap decoding, a smoke training and inference in mm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.dataset import keypoint_samples
from pipeline.keypoints.infer import (
    BODY_OFFSET_MM,
    decode_heatmaps,
    decode_keypoints,
    first_centre,
    predict_keypoints,
    shape_penalty,
)
from pipeline.keypoints.plane import sagittal_plane, spine_axes
from pipeline.keypoints.train import build_keypoint_model
from pipeline.localization.heatmaps import gaussian_heatmaps
from pipeline.segmentation.crops import array_image, reference_grid
from pipeline.segmentation.dataset import case_samples
from tests.pipeline.synthetic import box_spine


def test_plane_pixel_and_mm_round_trip_on_a_tilted_spine():
    up = np.array([0.0, 0.3, 1.0])
    plane = sagittal_plane((10.0, -20.0, 300.0), up, 64, 0.5, angle_deg=4.0)
    p = (10.0, -14.0, 309.0)
    assert plane.to_mm(plane.to_px(p)) == pytest.approx(p, abs=1e-9)
    # rows follow the spine axis: one row up is 0.5 mm along the (turned) axis
    a, b = np.array(plane.to_mm((10, 10))), np.array(plane.to_mm((11, 10)))
    assert np.linalg.norm(b - a) == pytest.approx(0.5)


def test_spine_axis_follows_the_neighbouring_centroids():
    ups = spine_axes([19, 20, 21], [(0, 0, 60), (0, 10, 30), (0, 20, 0)])
    assert ups[1] == pytest.approx(np.array([0, -10, 30]) / np.hypot(10, 30))
    assert spine_axes([5], [(0, 0, 0)])[0] == pytest.approx([0, 0, 1])


def test_decoding_finds_gaussian_peaks_to_a_tenth_of_a_pixel():
    pts = np.array([[20.3, 30.7], [40.0, 41.5], [10.6, 12.2], [50.5, 50.5], [33.3, 22.2], [5.9, 60.1]])
    hm = gaussian_heatmaps((64, 64), pts, 2.0).numpy()
    assert np.abs(decode_heatmaps(hm) - pts).max() < 0.1


# A normal body on a 0.75 mm plane: rows up (inferior -> superior), columns anterior -> posterior.
BODY = np.array([[60.0, 20.0], [30.0, 20.0], [59.0, 40.0], [31.0, 40.0], [60.0, 60.0], [30.0, 60.0]])


def test_the_shape_prior_accepts_bodies_and_fractures_and_rejects_impossible_points():
    assert shape_penalty(BODY, 0.75) == 0.0
    wedge = BODY.copy()                                                  # anterior collapse, grade 3
    wedge[0, 0] = 42.0
    wedge[2, 0] = 50.0
    assert shape_penalty(wedge, 0.75) == 0.0
    biconcave = BODY.copy()
    biconcave[2, 0] = 48.0
    biconcave[3, 0] = 42.0
    assert shape_penalty(biconcave, 0.75) == 0.0
    swapped = BODY.copy()                                                # A2 above A1
    swapped[[0, 1]] = swapped[[1, 0]]
    assert shape_penalty(swapped, 0.75) == float("inf")
    m2_on_next_body = BODY.copy()                                        # M2 one disc further down
    m2_on_next_body[3, 0] = 12.0
    assert shape_penalty(m2_on_next_body, 0.75) > 5.0


def test_a_second_peak_on_the_neighbour_loses_to_the_plausible_one_even_when_stronger():
    hm = gaussian_heatmaps((96, 96), BODY, 2.0, 10.0).numpy()
    # M2 also lights up one disc lower (the next body's upper endplate), a little stronger
    hm[3] = np.maximum(hm[3], gaussian_heatmaps((96, 96), np.array([[12.0, 40.0]]), 2.0, 11.0).numpy()[0])
    assert decode_heatmaps(hm)[3] == pytest.approx([12.0, 40.0], abs=0.1)       # the argmax blunders
    assert decode_keypoints(hm, 0.75)[3] == pytest.approx([31.0, 40.0], abs=0.1)  # the shape decides
    # with one clear peak per channel the decoding is the argmax
    clean = gaussian_heatmaps((96, 96), BODY, 2.0, 10.0).numpy()
    assert np.abs(decode_keypoints(clean, 0.75) - decode_heatmaps(clean)).max() < 1e-9


def test_first_centre_falls_back_in_front_of_the_centroid_when_the_mask_shows_no_body_there():
    # A foreground blob 25 mm *behind* the centroid (a segmentation that found only the arch).
    ref = reference_grid((0.0, 0.0, 0.0), 48, 2.0)
    arr = np.zeros((48, 48, 48), np.float32)
    arr[20:28, 32:40, 20:28] = 1.0                                          # z, y (posterior), x
    fg = array_image(arr, ref)
    c = first_centre(fg, (0.0, 0.0, 0.0), (0.0, 0.0, 1.0))
    assert c == pytest.approx((0.0, -BODY_OFFSET_MM, 0.0))
    # a body in front of the centroid is believed
    arr[:] = 0
    arr[20:28, 14:20, 20:28] = 1.0
    c = first_centre(array_image(arr, ref), (0.0, 0.0, 0.0), (0.0, 0.0, 1.0))
    assert -25.0 < c[1] < -3.0 and abs(c[2]) < 2.0


def test_smoke_training_and_inference_give_six_points_in_mm():
    torch.manual_seed(0)
    ct, labels, gt = box_spine(levels=("L1", "L2"), heights={"L2": (16.0, 22.0, 24.0)})
    seg = case_samples("box", ct, labels, gt["vertebrae"], size=48, spacing_mm=2.0, margin=0)
    fgs = [array_image(s.occupancy.astype(np.float32) / 8, reference_grid(v["centroid_mm"], 48, 2.0))
           for s, v in zip(seg, gt["vertebrae"])]
    ks = keypoint_samples(ct, gt["vertebrae"], fgs, np.random.default_rng(0), 3)
    assert ks.inputs.shape == (6, 2, 96, 96)
    # the unjittered plane keeps the A1-A2 distance of L2's keypoints
    kp = gt["vertebrae"][1]["keypoints_mm"]
    a1, a2 = ks.points[3, 0], ks.points[3, 1]
    assert np.linalg.norm(a1 - a2) * 0.75 == pytest.approx(np.linalg.norm(np.subtract(kp["A1"], kp["A2"])), abs=0.05)
    net = build_keypoint_model(base=4, depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = torch.from_numpy(ks.inputs.astype(np.float32))
    t = torch.stack([gaussian_heatmaps((96, 96), p, 2.0, 10.0) for p in ks.points])
    losses = []
    for _ in range(15):
        loss = F.smooth_l1_loss(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    plane = sagittal_plane(gt["vertebrae"][0]["centroid_mm"])
    out = predict_keypoints(net, ks.inputs[:1].astype(np.float32), [plane])
    assert list(out[0]) == list(KEYPOINT_NAMES)
    assert all(len(p) == 3 for p in out[0].values())


def test_locate_keypoints_returns_points_on_each_final_plane_with_parasagittal_averaging():
    from pipeline.keypoints.infer import locate_keypoints

    torch.manual_seed(0)
    ct, labels, gt = box_spine(levels=("L1", "L2"))
    seg = case_samples("box", ct, labels, gt["vertebrae"], size=48, spacing_mm=2.0, margin=0)
    fgs = [array_image(s.occupancy.astype(np.float32) / 8, reference_grid(v["centroid_mm"], 48, 2.0))
           for s, v in zip(seg, gt["vertebrae"])]
    cents = [v["centroid_mm"] for v in gt["vertebrae"]]
    ups = spine_axes([20, 21], cents)
    net = build_keypoint_model(base=4, depth=3)
    for offsets in ((0.0,), (-1.5, 0.0, 1.5)):
        planes, kps = locate_keypoints(net, ct, fgs, cents, ups, 96, 0.75, use_mask=False, offsets_mm=offsets)
        assert len(planes) == len(kps) == 2
        for plane, kp in zip(planes, kps):
            normal = np.cross(plane.col_axis, plane.row_axis)
            for p in kp.values():
                assert abs(float(np.subtract(p, plane.centre_mm) @ normal)) < 1e-6
            moved = plane.shifted(1.5)
            assert np.subtract(moved.centre_mm, plane.centre_mm) == pytest.approx(1.5 * normal)
