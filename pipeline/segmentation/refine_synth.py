"""1 mm refiner crops of CT synthesised from real vertebra masks (:mod:`pipeline.synthesis`).

The refiner learns where a vertebra's boundary lies given the CT and a prior. Phantom crops teach
the phantom's shapes; the real CTs are few. Here, as for the 2 mm network
(:func:`pipeline.synthesis.seg_source.case_crops`), each case poses one real mask of the split's
train side (a random level and its neighbour, the first fractured at times), renders it with a
randomised appearance around each target, and cuts the target's 1 mm crop and occupancy
(:func:`pipeline.segmentation.refine_training.refine_samples`) and, with a 2 mm network, that
network's own prior on it (:func:`pipeline.segmentation.coarse_prior.priors_on_ct`): the
posterior elements and neighbours' bone it loses or claims on real anatomy, which a prior
simulated from the truth never shows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.segmentation.dataset import MARGIN
from pipeline.segmentation.infer import CROP_SIZE, CROP_SPACING_MM
from pipeline.segmentation.refine_training import REFINE_CROP, refine_samples

#: Targets per synthesised case (a random level and its neighbour) and the share fractured.
TARGETS = 2
FRACTURED_SHARE = 0.33


def synth_refine_case(mask, rng: np.random.Generator, coarse=None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(ct int16, occupancy uint8 eighths, prior uint8 or None)`` of the whole targets of one
    synthesised case of ``mask`` (a :class:`pipeline.synthesis.seg_source.RealMask`)."""
    from pipeline.synthesis.generate import render_case
    from pipeline.synthesis.geometry import label_centroids
    from pipeline.synthesis.seg_source import RENDER_PAD_MM, SEG_SYNTH_OPTIONS, posed_case

    empty = np.zeros((0,) + (REFINE_CROP,) * 3)
    posed = posed_case(mask, rng, SEG_SYNTH_OPTIONS, TARGETS, FRACTURED_SHARE)
    if posed is None:
        return empty.astype(np.int16), empty.astype(np.uint8), None
    case, targets, whole = posed
    cents = label_centroids(case.labels)
    # the 2 mm network's crop (with its margin) is the wider of the two
    half = 0.5 * max(REFINE_CROP, (CROP_SIZE + 2 * MARGIN) * CROP_SPACING_MM) + RENDER_PAD_MM
    cts, occs, priors = [], [], []
    for lab in targets:
        if lab not in whole:
            continue
        rendered = render_case(case, rng, SEG_SYNTH_OPTIONS, focus_mm=cents[lab], half_width_mm=half)
        vert = {"label": int(lab), "centroid_mm": rendered.centroids_mm[lab]}
        c, o = refine_samples(rendered.ct, rendered.labels, [vert])
        cts.append(c)
        occs.append(o)
        if coarse is not None:
            from pipeline.segmentation.coarse_prior import priors_on_ct

            priors.append(priors_on_ct(coarse, rendered.ct, [vert["centroid_mm"]], REFINE_CROP, rng))
    if not cts:
        return empty.astype(np.int16), empty.astype(np.uint8), None
    return (np.concatenate(cts), np.concatenate(occs),
            np.concatenate(priors) if coarse is not None else None)


def synth_refine_samples(masks: Sequence, cases: int, seed: int, coarse=None,
                         log: Callable[[str], None] = lambda s: None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`synth_refine_case` for ``cases`` cases round robin over ``masks`` (generator
    ``[seed, k]`` for case ``k``), concatenated."""
    cts, occs, priors = [], [], []
    for k in range(cases):
        mask = masks[k % len(masks)]
        c, o, p = synth_refine_case(mask, np.random.default_rng([seed, k]), coarse)
        cts.append(c)
        occs.append(o)
        if p is not None:
            priors.append(p)
        if (k + 1) % 10 == 0 or k + 1 == cases:
            log(f"synthesised refiner crops: case {k + 1}/{cases} ({sum(len(x) for x in cts)} crops)")
    if not sum(len(c) for c in cts):
        raise ValueError("no whole synthesised vertebra: no refiner crops")
    return (np.concatenate(cts), np.concatenate(occs),
            np.concatenate(priors) if coarse is not None else None)


def cached_synth_refine_samples(data: Path, cache_dir: Path, cases: int, seed: int, coarse=None,
                                log: Callable[[str], None] = lambda s: None,
                                exclude: Sequence[str] = ()
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`synth_refine_samples` from the masks of ``data`` (the real-spine pack: its train
    side only; another folder: all its masks) but ``exclude``'s subjects (held out for a bench
    that judges on them: ``bench/segmentation_synth.py --subjects``), cached under
    ``cache_dir`` by the masks, the number of cases, the seed and, with ``coarse``, the
    network's tag."""
    from pipeline.realdata.pack import is_pack
    from pipeline.segmentation.coarse_prior import network_tag
    from pipeline.synthesis.seg_source import CACHE_VERSION, find_masks, training_subjects

    data = Path(data)
    masks = [m for m in find_masks(data, training_subjects() if is_pack(data) else None)
             if m.subject not in set(exclude)]
    if not masks:
        raise ValueError(f"no VerSe vertebra mask under {data} (subjects excluded: "
                         f"{', '.join(exclude) or 'none'}): nothing to synthesise from")
    key = ("pack-train" if is_pack(data) else f"folder-{data.name}") + \
        ("-without-" + "-".join(sorted(set(exclude))) if exclude else "")
    tag = network_tag(coarse) if coarse is not None else "sim"
    path = Path(cache_dir) / f"ref-synth{CACHE_VERSION}-{key}-n{cases}-s{seed}-{tag}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["ct"], z["occ"], (z["prior"] if coarse is not None else None)
    ct, occ, prior = synth_refine_samples(masks, cases, seed, coarse, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ct=ct, occ=occ, **({"prior": prior} if prior is not None else {}))
    tmp.replace(path)
    return ct, occ, prior
