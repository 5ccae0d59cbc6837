"""Training crops of the segmentation network from real CT (the ``train`` side of the split).

Each vertebra of each real case becomes a :class:`pipeline.segmentation.dataset.Sample`, cut
from the CT in the axial LPS layout that a DICOM series gives the pipeline (so that training
sees what inference sees). A vertebra graded 1-3 by an expert is the fractured class; every
other vertebra (graded 0, or not graded) the normal class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pipeline.realdata.pack import RealCase
from pipeline.realdata.truth import axial_lps, truth_vertebrae, whole_truth
from pipeline.segmentation.dataset import Sample, case_samples, margin_for


def real_seg_samples(cases: Iterable[RealCase], size: int, spacing_mm: float,
                     log: Callable[[str], None] = lambda s: None) -> list[Sample]:
    """Crops of every vertebra (slivers left out) of ``cases``."""
    out: list[Sample] = []
    for case in cases:
        ct, mask = axial_lps(case.ct), axial_lps(case.mask)
        verts = [dict(v, fractured=bool(v["genant_grade"])) for v in truth_vertebrae(case, mask)
                 if v["partial_reason"] != "sliver" and np.all(np.isfinite(v["centroid_mm"]))]
        out.extend(case_samples(f"real-{case.case_id}", ct, mask, verts, size, spacing_mm,
                                margin_for(spacing_mm)))
        log(f"real case {case.case_id}: {len(verts)} crops")
    return out


def real_refine_samples(cases: Iterable[RealCase], cache_dir: Path, key: str,
                        log: Callable[[str], None] = lambda s: None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The refiner's 1 mm crops (:func:`pipeline.segmentation.refine_training.refine_samples`) of every
    whole vertebra of ``cases``, cached under ``cache_dir`` by ``key``."""
    from pipeline.segmentation.refine_training import REFINE_CROP, refine_samples

    path = Path(cache_dir) / f"ref-real-{key}-c{REFINE_CROP}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["ct"], z["occ"]
    cts, occs = [], []
    for case in cases:
        ct, mask, verts = whole_truth(case)
        if verts:
            c, o = refine_samples(ct, mask, verts)
            cts.append(c)
            occs.append(o)
        log(f"real case {case.case_id}: {len(verts)} refiner crops")
    if not cts:
        raise ValueError(f"no whole vertebra in the real data ({key})")
    ct_all, occ_all = np.concatenate(cts), np.concatenate(occs)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, ct=ct_all, occ=occ_all)
    return ct_all, occ_all


def real_cascade_priors(cases: Iterable[RealCase], cache_dir: Path, key: str, coarse,
                        log: Callable[[str], None] = lambda s: None) -> np.ndarray:
    """The 2 mm network's priors (:func:`pipeline.segmentation.coarse_prior.priors_on_ct`) of
    the crops of :func:`real_refine_samples` (same cases, same vertebrae, same order), cached
    under ``cache_dir`` by ``key`` and the network's tag."""
    from pipeline.segmentation.coarse_prior import network_tag, priors_on_ct
    from pipeline.segmentation.refine_training import REFINE_CROP

    path = Path(cache_dir) / f"cas-real-{key}-{network_tag(coarse)}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["prior"]
    rng = np.random.default_rng(0)
    parts = []
    for case in cases:
        ct, mask, verts = whole_truth(case)
        if verts:
            parts.append(priors_on_ct(coarse, ct, [v["centroid_mm"] for v in verts], REFINE_CROP,
                                      rng))
        log(f"real case {case.case_id}: {len(verts)} coarse priors")
    if not parts:
        raise ValueError(f"no whole vertebra in the real data ({key})")
    prior = np.concatenate(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, prior=prior)
    return prior


def cached_real_samples(cases: Callable[[], Iterable[RealCase]], key: str, cache_dir: Path,
                        size: int, spacing_mm: float,
                        log: Callable[[str], None] = lambda s: None) -> list[Sample]:
    """:func:`real_seg_samples`, cached under ``cache_dir`` by ``key`` (the subjects' names)
    and the crop geometry."""
    from pipeline.segmentation.dataset import load_samples, save_samples

    path = Path(cache_dir) / f"real-{key}-c{size}x{spacing_mm:g}mm.npz"
    if path.exists():
        return load_samples(path)
    samples = real_seg_samples(cases(), size, spacing_mm, log)
    if samples:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_samples(samples, path)
    return samples



def training_cases(data: Path) -> tuple[str, Callable[[], Iterable[RealCase]]]:
    """The real training cases of ``data``: the ``train`` side of the split where ``data`` is
    the real-spine pack, every case of any other VerSe-layout folder (a hospital's own
    training data). Returns a cache key and a function that yields them."""
    from pipeline.realdata.pack import is_pack, iter_folder_cases, iter_pack_cases
    from pipeline.realdata.split import load_split

    data = Path(data)
    if is_pack(data):
        subjects = list(load_split().train)
        return "pack-train", lambda: iter_pack_cases(data, subjects)
    return f"folder-{data.name}", lambda: iter_folder_cases(data)
