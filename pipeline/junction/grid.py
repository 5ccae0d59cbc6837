"""The junction classifier's grid: CT resampled to 4 mm on LPS axes (the localization
network's grid), in HU."""
from __future__ import annotations

import SimpleITK as sitk

from pipeline.preprocess import prepare

#: Grid of the classifier (mm).
SPACING_MM = 4.0


def hu_grid(ct: sitk.Image) -> sitk.Image:
    """``ct`` on the classifier's LPS grid (HU, z increasing cranially)."""
    return prepare(ct, SPACING_MM).image
