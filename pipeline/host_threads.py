"""Host-side work per vertebra spread over threads while a GPU runs the networks.

With the networks on a GPU, what is left of a study's time is the host's per-vertebra work:
SimpleITK resampling of crops, refiner boxes, sagittal planes and the merge (each a few
milliseconds, on images too small for ITK's own threads to pay off). SimpleITK and numpy release
the GIL, so a thread pool over the vertebrae divides that wall time by the cores a GPU machine
has. On the CPU the cores are busy with the networks: one thread (the results are the same).

What may run here: functions whose ITK filters either read images of their own thread (the
merge's per-vertebra maps) or resample the shared CT with ``sitk.Resample`` (the refiner's
inputs, the sagittal planes): ITK's resampler asks for the whole of its input, so the threads
write the same requested region into the shared image and read it unchanged. Not here:
``RegionOfInterest``/``Extract`` of the shared CT (each would set a different requested region
on it: :func:`pipeline.segmentation.crops.ct_crop` stays on the calling thread).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: Most threads for the host's per-vertebra work next to a GPU.
MAX_HOST_THREADS = 8


def host_threads(device: str | torch.device) -> int:
    """Threads for per-vertebra host work: up to :data:`MAX_HOST_THREADS` (and the cores) when the
    networks run on a GPU, 1 on the CPU."""
    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(MAX_HOST_THREADS, os.cpu_count() or 1))


def host_map(fn: Callable[[T], R], items: Iterable[T], device: str | torch.device) -> list[R]:
    """``[fn(x) for x in items]``, in order, on :func:`host_threads` threads."""
    items = list(items)
    workers = min(host_threads(device), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="spine-host") as pool:
        return list(pool.map(fn, items))


def host_iter(fn: Callable[[T], R], items: Iterable[T], device: str | torch.device) -> Iterator[R]:
    """``fn`` of each item, in order: lazily on one thread (one result alive at a time), else
    all computed at once by :func:`host_map`."""
    if host_threads(device) <= 1:
        return (fn(x) for x in items)
    return iter(host_map(fn, items, device))
