"""Preprocessing: one orientation, SimpleITK resampling, clamp and z-score (paper eq. 19)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipeline.preprocess import AIR_HU, CLAMP_HU, clamp, normalize, prepare, reorient, resample, zscore


def _image(array: np.ndarray, spacing=(0.8, 0.8, 1.5), direction=None, origin=(-10.0, 20.0, 30.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def test_reorient_puts_index_axes_towards_left_posterior_superior():
    a = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    # an RAI-ish image: x towards the right, z towards inferior
    img = _image(a, direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1))
    out = reorient(img)
    assert np.allclose(out.GetDirection(), np.eye(3).ravel())
    # the same physical point holds the same value
    p = img.TransformIndexToPhysicalPoint((2, 3, 4))
    assert out[out.TransformPhysicalPointToIndex(p)] == img[2, 3, 4]


def test_resample_keeps_extent_and_physical_positions():
    z, y, x = np.mgrid[0:60, 0:50, 0:40]
    a = (x * 0.8 * 2 + y * 0.8 * 3 + z * 1.5).astype(np.float32)  # linear in mm: preserved by averaging
    img = _image(a)
    out = resample(img, 4.0)
    assert out.GetSpacing() == (4.0, 4.0, 4.0)
    assert np.allclose(np.array(out.GetSize()) * 4.0, [np.ceil(40 * 0.8 / 4) * 4, np.ceil(50 * 0.8 / 4) * 4,
                                                        np.ceil(60 * 1.5 / 4) * 4])
    # an interior voxel's value matches the linear function at its physical position
    idx = (3, 4, 10)
    px, py, pz = np.array(out.TransformIndexToPhysicalPoint(idx)) - np.array(img.GetOrigin())
    assert abs(out[idx] - (px * 2 + py * 3 + pz)) < 1.0


def test_clamp_and_zscore_follow_eq19():
    a = np.array([-5000.0, 0.0, 100.0, 10000.0])
    c = clamp(a)
    assert c.min() == CLAMP_HU[0] and c.max() == CLAMP_HU[1]
    z = zscore(c)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    assert np.allclose(normalize(a), z)


def test_prepare_gives_zscored_array_and_air_pad_value():
    a = np.full((40, 40, 40), AIR_HU, np.float32)
    a[10:30, 10:30, 10:30] = 400
    p = prepare(_image(a, spacing=(1.0, 1.0, 1.0)), 2.0)
    assert p.array.shape == (20, 20, 20)
    assert abs(float(p.array.mean())) < 1e-4
    assert abs(p.pad_value - p.array.min()) < 1e-3
    mm = p.index_to_mm([[1.5, 2.0, 3.25]])
    assert np.allclose(p.mm_to_index(mm), [[1.5, 2.0, 3.25]])
