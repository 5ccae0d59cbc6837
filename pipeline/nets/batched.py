"""Inference of a network over many inputs, a batch at a time (crops, planes)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


@torch.no_grad()
def forward_batched(model: torch.nn.Module, inputs: np.ndarray, device: str | torch.device = "cpu",
                    batch: int = 16, post: Callable[[torch.Tensor], torch.Tensor] = lambda y: y,
                    empty_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``post(model(x))`` for consecutive batches of ``inputs`` (float32 on ``device``), as one
    float32 array on the CPU; ``np.zeros(empty_shape)`` when there are no inputs."""
    model.eval()
    out = [post(model(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch])).float().to(device)).float())
           .cpu().numpy() for i in range(0, len(inputs), batch)]
    if not out:
        return np.zeros(empty_shape or (0,), np.float32)
    return np.concatenate(out)
