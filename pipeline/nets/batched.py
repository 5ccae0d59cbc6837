"""Inference of a network over many inputs, a batch at a time (crops, planes)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


@torch.no_grad()
def forward_batched(model: torch.nn.Module, inputs: np.ndarray, device: str | torch.device = "cpu",
                    batch: int = 16, post: Callable[[torch.Tensor], torch.Tensor] = lambda y: y,
                    empty_shape: tuple[int, ...] | None = None, fixed_shape: bool = False) -> np.ndarray:
    """``post(model(x))`` for consecutive batches of ``inputs`` (float32 on ``device``), as one
    float32 array on the CPU; ``np.zeros(empty_shape)`` when there are no inputs.

    ``fixed_shape``: a short last batch is filled up with copies of its first input (their outputs
    dropped), so that every call has the same shape: a GPU library chooses its kernels per shape.
    Only for networks that treat the inputs of a batch independently (no batch normalisation in
    training mode)."""
    model.eval()
    out = []
    for i in range(0, len(inputs), batch):
        x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch])).float().to(device)
        n = x.shape[0]
        if fixed_shape and len(inputs) > batch and n < batch:
            x = torch.cat([x, x[:1].expand(batch - n, *x.shape[1:])])
        out.append(post(model(x)[:n]).float().cpu().numpy())
    if not out:
        return np.zeros(empty_shape or (0,), np.float32)
    return np.concatenate(out)
