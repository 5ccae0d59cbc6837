"""Keypoint inference: plane -> 2D M-SCN -> six points in LPS mm (paper eq. 15-16)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.plane import SagittalPlane
from pipeline.segmentation.crops import normalise

def plane_input(ct: sitk.Image, fg: sitk.Image | None, plane: SagittalPlane) -> np.ndarray:
    """The network input on ``plane``: ``[2, row, col]`` = (z-scored CT, foreground probability)."""
    hu = plane.sample(ct, True, -1024.0)
    mask = plane.sample(fg, True, 0.0) if fg is not None else np.zeros_like(hu)
    return np.stack([normalise(hu), mask.astype(np.float32)])


def decode_heatmaps(heatmaps: np.ndarray) -> np.ndarray:
    """Sub-pixel ``(row, col)`` of each channel: argmax (eq. 16), refined by a parabola through the
    logarithms around the peak (exact for the Gaussian targets; the localization decoder's
    :func:`pipeline.localization.heatmaps.channel_peaks`)."""
    from pipeline.localization.heatmaps import channel_peaks

    positions, _ = channel_peaks(np.asarray(heatmaps))
    return positions


@torch.no_grad()
def predict_keypoints(model: torch.nn.Module, inputs: np.ndarray, planes: Sequence[SagittalPlane],
                      device: str | torch.device = "cpu", batch: int = 16
                      ) -> list[dict[str, tuple[float, float, float]]]:
    """Keypoints in LPS mm for each input ``[2, row, col]`` on its plane."""
    model.eval()
    result = []
    for i in range(0, len(inputs), batch):
        x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch])).float().to(device)
        hm = model(x).float().cpu().numpy()
        for h, plane in zip(hm, planes[i:i + batch]):
            rc = decode_heatmaps(h)
            result.append({name: plane.to_mm(rc[k]) for k, name in enumerate(KEYPOINT_NAMES)})
    return result
