"""Which vertebrae the pipeline calls cut by the field of view (and so never grades)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pipeline.run import _cut_by_fov
from pipeline.segmentation.crops import reference_grid


def _vertebra(centre_z: float, rows: slice) -> SimpleNamespace:
    """A 16^3 crop of 2 mm centred at ``z = centre_z`` whose foreground fills ``rows`` (z)."""
    crop = reference_grid((0.0, 0.0, centre_z), 16, 2.0)
    fg = np.zeros((16, 16, 16), np.float32)
    fg[rows, 6:10, 6:10] = 1.0
    return SimpleNamespace(foreground=fg, crop=crop)


def test_foreground_at_the_volume_end_inside_the_crop_is_a_cut():
    # crop rows at z = -15 .. +15 mm; the volume ends at z = -5 (row 5) below, +100 above
    assert _cut_by_fov(_vertebra(0.0, slice(5, 12)), z_lo=-5.0, z_hi=100.0)
    assert _cut_by_fov(_vertebra(0.0, slice(3, 11)), z_lo=-100.0, z_hi=5.0)


def test_foreground_short_of_the_volume_end_is_no_cut():
    assert not _cut_by_fov(_vertebra(0.0, slice(7, 12)), z_lo=-5.0, z_hi=100.0)


def test_foreground_at_the_crop_border_inside_the_volume_is_no_cut():
    # a segmentation leaking to the crop's border, far from either end of the volume
    assert not _cut_by_fov(_vertebra(0.0, slice(0, 10)), z_lo=-200.0, z_hi=200.0)
    assert not _cut_by_fov(_vertebra(0.0, slice(6, 16)), z_lo=-200.0, z_hi=200.0)


def test_a_crop_entirely_outside_the_volume_is_a_cut():
    assert _cut_by_fov(_vertebra(0.0, slice(6, 10)), z_lo=50.0, z_hi=200.0)
