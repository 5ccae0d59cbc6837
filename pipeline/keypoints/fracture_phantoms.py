"""Extra keypoint training planes from phantoms with forced fractures.

The "auto" phantoms hold few fractured vertebrae (about 8 %), and the mild ones sit next to the
grade boundaries, so the shipped keypoint model also saw seeds 140-151 made here:

    spine-node train keypoint-planes 140-151 [--cache runs/cache]

Each seed takes the level range and fractures of ``SPECS[i % len(SPECS)]`` and writes
``kp-phantom-<seed>-acq.npz`` (6 jittered planes per vertebra; mask = the true occupancy at 2 mm).

Thick-slice acquisitions (routine abdominal and chest CT, where vertebral fractures are found
opportunistically) blur the endplates along the spine; the seed's own acquisition rarely draws
them, so ``--slice-spacing 2.5,3.0`` forces that slice spacing and thickness (cycled over the
seeds), and ``--auto`` keeps the seed's own random levels and fractures (mostly normal
vertebrae) instead of ``SPECS``:

    spine-node train keypoint-planes 160-171 --slice-spacing 2.5,3.0 --auto
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SPECS = [
    ("T4-T12", "T6:1:biconcave,T9:1:wedge,T11:2:crush"),
    ("T10-L5", "T12:1:wedge,L2:1:biconcave,L4:2:biconcave"),
    ("T1-T9", "T3:1:crush,T5:2:wedge,T7:1:biconcave"),
    ("T8-L4", "T10:2:biconcave,L1:1:crush,L3:1:wedge"),
    ("C4-T6", "C6:1:wedge,T2:1:biconcave,T4:3:wedge"),
    ("T6-L2", "T8:1:wedge,T11:1:biconcave,L1:3:crush"),
]


def write_fracture_phantoms(seeds: Sequence[int], cache: Path, spacings: Sequence[float] = (),
                            auto: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Write the keypoint planes of each seed's phantom into ``cache`` (module docstring); the
    files written. Evaluation seeds are refused."""
    import torch

    from pipeline.keypoints.dataset import keypoint_samples, save_keypoint_samples
    from pipeline.phantom import generate
    from pipeline.seeds import refuse_evaluation_seeds
    from pipeline.segmentation.caches import keypoint_cache_path
    from pipeline.segmentation.crops import array_image, occupancy, reference_grid

    refuse_evaluation_seeds(list(seeds))
    Path(cache).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    written = []
    for i, s in enumerate(seeds):
        t = time.time()
        levels, fr = (None, "auto") if auto else SPECS[i % len(SPECS)]
        acq = None
        if spacings:
            ss = float(spacings[i % len(spacings)])
            acq = {"slice_spacing": ss, "slice_thickness": ss}
        ph = generate(s, levels=levels, fractures=fr, acquisition=acq)
        verts = ph.gt["vertebrae"]
        fgs = [array_image(occupancy(ph.labels, v["label"], v["centroid_mm"], 64, 2.0).astype(np.float32) / 8.0,
                           reference_grid(v["centroid_mm"], 64, 2.0)) for v in verts]
        kps = keypoint_samples(ph.ct, verts, fgs, np.random.default_rng(s), 6, f"phantom-{s}")
        path = keypoint_cache_path(cache, s)
        save_keypoint_samples(kps, path)
        written.append(Path(path))
        log(f"seed {s}: {len(kps.inputs)} planes, {time.time() - t:.1f} s")
    return written
