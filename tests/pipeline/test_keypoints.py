"""Keypoints: the plane geometry, heatmap decoding, a smoke training and inference in mm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.dataset import keypoint_samples
from pipeline.keypoints.infer import decode_heatmaps, predict_keypoints
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
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    plane = sagittal_plane(gt["vertebrae"][0]["centroid_mm"])
    out = predict_keypoints(net, ks.inputs[:1].astype(np.float32), [plane])
    assert list(out[0]) == list(KEYPOINT_NAMES)
    assert all(len(p) == 3 for p in out[0].values())
