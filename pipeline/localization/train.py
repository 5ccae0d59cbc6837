"""Training of the localization M-SCN (paper sections 2.2.3 and 3.2; issue 4).

Smooth-L1 loss (eq. 9, sigma = 1) between predicted and Gaussian target heatmaps, summed over
voxels and channels and averaged over the batch, by default foreground-weighted
(``fg_weight``; 0 gives the paper's plain loss); gradient clipping 2.0; weight decay 5e-4;
ReduceLROnPlateau on the validation score. The optimiser defaults to Adam (lr 2e-3, batch 2):
on a 2-core CPU the paper's SGD at lr 1e-4 barely moves in the iterations we can afford
(docs/archive/model-card-history.md has the measurements); ``optimizer="sgd"`` restores the paper's setting.

Every ``val_every`` iterations the whole validation volumes go through the real inference
(:mod:`pipeline.localization.infer`); the presence threshold is chosen on them, and the best
checkpoint by validation score is kept as a shippable weight file (``best.pt``). The validation
volumes are the phantom validation seeds and, with ``val_synth_cases``, volumes synthesised
from the train side's real masks with a seed of their own (``val_synth_seed``: none of them is
a training volume); each group's score counts equally, so that a checkpoint that learns the
phantom and forgets real anatomy is not chosen. ``last.pt``
holds everything needed to resume (model, optimiser, scheduler, sampler RNG, history).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.levels import LEVELS
from pipeline.localization.dataset import Case, PatchSampler, cached_phantom_cases
from pipeline.localization.infer import detect, predict_heatmaps
from pipeline.localization.train_config import TrainConfig
from pipeline.nets import MSCN
from pipeline.registry import weights_payload
from pipeline.seeds import EVALUATION_SEEDS
from pipeline.training import check_synth_validation, cosine_lr, train_device, train_step

BUILDER = "pipeline.nets.mscn:build_mscn"
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
ID_RADIUS_MM = 20.0


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, fg_weight: float = 0.0) -> torch.Tensor:
    """Smooth-L1 (eq. 9, sigma 1), summed over channels and voxels, mean over the batch.

    ``fg_weight`` > 0 weighs each voxel by ``1 + fg_weight * target / max(target)``: the few voxels
    near a centroid count more than the sea of background, which shortens the phase in which
    an all-zero output is the network's best answer (the paper's loss: 0).
    """
    loss = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    if fg_weight:
        loss = loss * (1 + fg_weight * target / target.amax().clamp_min(1e-6))
    return loss.sum() / pred.shape[0]


def case_detections(heatmaps: np.ndarray, case: Case, threshold: float,
                    method: str = "argmax", relabel: bool = False) -> dict[int, np.ndarray]:
    """Decoded detections of a case in grid millimetres: level order -> [x, y, z] (z cranial).

    ``heatmaps`` in units of the target peak (divided by the amplitude); ``relabel``: the joint
    relabelling along the found spine, as inference does where the weights ask for it.
    """
    return {k: pos[::-1] * case.spacing_mm
            for k, pos, _ in detect(heatmaps, threshold, case.spacing_mm, method, relabel=relabel)}


def case_score(found: dict[int, np.ndarray], case: Case) -> dict[str, float]:
    """Identification, error and false positives of one validation case (grid millimetres).

    Partial (cut) vertebrae are neither required nor false positives.
    """
    gt = {k: case.centers[k][::-1] * case.spacing_mm for k in range(len(case.centers))
          if not np.isnan(case.centers[k, 0])}
    full = [k for k in gt if not case.partial[k]]
    errors, identified = [], 0
    for k in full:
        if k in found:
            e = float(np.linalg.norm(found[k] - gt[k]))
            errors.append(e)
            identified += e <= ID_RADIUS_MM
    fp = sum(1 for k in found if k not in gt or np.linalg.norm(found[k] - gt[k]) > ID_RADIUS_MM)
    clipped = [min(e, ID_RADIUS_MM) for e in errors] + [ID_RADIUS_MM] * (len(full) - len(errors))
    return {"n": len(full), "identified": identified, "error_sum": float(sum(e for e in errors if e <= ID_RADIUS_MM)),
            "fp": fp, "penalty": float(sum(clipped) + ID_RADIUS_MM * fp)}


def validate(model: torch.nn.Module, cases: Sequence[Case], cfg: TrainConfig,
             device: torch.device | str = "cpu",
             groups: dict[str, Sequence[Case]] | None = None) -> dict[str, Any]:
    """Whole-volume inference on the validation cases; the decoder and threshold with the lowest
    penalty. ``groups`` (name -> cases) replaces ``cases``: each group's penalty counts
    equally (:func:`choose_decoder_groups`)."""
    groups = dict(groups) if groups else {"phantom": cases}

    def maps(cs: Sequence[Case]) -> list[np.ndarray]:
        return [predict_heatmaps(model, c.array, cfg.patch, c.pad_value, cfg.overlap, device) / cfg.amplitude
                for c in cs]

    return choose_decoder_groups({name: (maps(cs), cs) for name, cs in groups.items()},
                                 relabel=bool(cfg.relabel))


def _figures(maps: Sequence[np.ndarray], cases: Sequence[Case], method: str, t: float,
             relabel: bool) -> dict[str, Any]:
    scores = [case_score(case_detections(h, c, t, method, relabel), c) for h, c in zip(maps, cases)]
    n = sum(s["n"] for s in scores)
    ident = sum(s["identified"] for s in scores)
    return {"id_rate": ident / max(n, 1), "error_mm": sum(s["error_sum"] for s in scores) / max(ident, 1),
            "fp": sum(s["fp"] for s in scores), "score": sum(s["penalty"] for s in scores) / max(n, 1)}


def choose_decoder(maps: Sequence[np.ndarray], cases: Sequence[Case],
                   methods: Sequence[str] = ("argmax", "joint"), relabel: bool = False) -> dict[str, Any]:
    """The (decoder, threshold) with the lowest validation penalty, and its figures."""
    return choose_decoder_groups({"cases": (maps, cases)}, methods, relabel)


def choose_decoder_groups(groups: dict[str, tuple[Sequence[np.ndarray], Sequence[Case]]],
                          methods: Sequence[str] = ("argmax", "joint"), relabel: bool = False
                          ) -> dict[str, Any]:
    """As :func:`choose_decoder` over several validation groups (name -> (maps, cases)): the
    score is the mean of the groups' scores; the figures of the first group are the top-level
    ones, and with more than one group every group's are under ``groups``."""
    best = None
    for method, t in [(m, t) for m in methods for t in THRESHOLDS]:
        per = {name: _figures(maps, cases, method, t, relabel) for name, (maps, cases) in groups.items()}
        res = {"decoder": method, "threshold": t, **next(iter(per.values())),
               "score": float(np.mean([g["score"] for g in per.values()]))}
        if len(per) > 1:
            res["groups"] = per
        if best is None or res["score"] < best["score"]:
            best = res
    return best


def build_model(cfg: TrainConfig) -> MSCN:
    return MSCN(spatial_dims=3, in_channels=1, out_channels=len(LEVELS), base=cfg.base, variant=cfg.variant)


def load_cases(cfg: TrainConfig, seeds: Sequence[int], log: Callable[[str], None]) -> list[Case]:
    if cfg.data == "phantom":
        bad = sorted(set(seeds) & set(EVALUATION_SEEDS))
        if bad:
            raise ValueError(f"seeds {bad} are evaluation seeds (9001-9010); choose others")
        cache = Path(cfg.cache_dir or Path(cfg.out_dir).parent / "cache")
        return cached_phantom_cases(seeds, cfg.spacing_mm, cache, log, cfg.workers)
    return real_cases(Path(cfg.data), cfg.spacing_mm, log)


def extra_cases(cfg: TrainConfig, say: Callable[[str], None]) -> list[Case]:
    """Real cases (``real_data``, each ``real_repeat`` times) and volumes synthesised from real
    masks (``synth_real_dir``), added to the phantom training cases."""
    out: list[Case] = []
    if cfg.real_data:
        out += real_cases(Path(cfg.real_data), cfg.spacing_mm, say) * cfg.real_repeat
    if cfg.synth_real_dir and cfg.synth_cases > 0:
        from pipeline.synthesis.loc_source import cached_synth_cases

        cache = Path(cfg.cache_dir or Path(cfg.out_dir).parent / "cache")
        out += cached_synth_cases(Path(cfg.synth_real_dir), cfg.synth_cases, cfg.spacing_mm,
                                  cache, cfg.seed, say)
    return out


def synth_validation_cases(cfg: TrainConfig, say: Callable[[str], None]) -> list[Case]:
    """``cfg.val_synth_cases`` volumes synthesised from the train side's masks with the seed
    ``cfg.val_synth_seed`` (never the training volumes' seed)."""
    from pipeline.synthesis.loc_source import cached_synth_cases

    check_synth_validation(cfg.synth_real_dir, cfg.seed, cfg.val_synth_seed, "volumes")
    cache = Path(cfg.cache_dir or Path(cfg.out_dir).parent / "cache")
    cases = cached_synth_cases(Path(cfg.synth_real_dir), cfg.val_synth_cases, cfg.spacing_mm,
                               cache, cfg.val_synth_seed, say)
    say(f"{len(cases)} synthesised validation volumes (seed {cfg.val_synth_seed})")
    return cases


def init_localization(model: torch.nn.Module, source: str, say: Callable[[str], None]) -> None:
    """Start from the installed localization weights (``"shipped"``) or a run's ``best.pt``."""
    from pipeline.registry import WEIGHTS_DIR, read_manifest

    path = (WEIGHTS_DIR / read_manifest()["localization"]["file"]) if source == "shipped" \
        else Path(source)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    state = ck.get("state_dict", ck.get("model"))
    model.load_state_dict(state)
    say(f"initialised from {path}")


def real_cases(data: Path, spacing_mm: float, log: Callable[[str], None]) -> list[Case]:
    """The real training cases of a VerSe-layout folder (the real-spine pack: only the train
    side of its split, :func:`pipeline.realdata.samples.training_cases`), in the axial LPS
    layout of a DICOM series; vertebrae cut by the field of view are marked partial."""
    from pipeline.localization.dataset import make_case
    from pipeline.realdata.samples import training_cases
    from pipeline.realdata.truth import axial_lps, truth_vertebrae

    key, cases = training_cases(data)
    out = []
    for case in cases():
        truth = truth_vertebrae(case, axial_lps(case.mask))
        partial = [v["label"] for v in truth if v["partial"]]
        out.append(make_case(case.case_id, axial_lps(case.ct), case.centroids_mm, spacing_mm,
                             partial))
    log(f"{len(out)} real cases from {data} ({key})")
    return out


def train(cfg: TrainConfig, log: Callable[[str], None] = print, train_cases: Sequence[Case] | None = None,
          val_cases: Sequence[Case] | None = None) -> Path:
    """Train; returns the path of the best shippable weight file (``out_dir/best.pt``).

    ``train_cases``/``val_cases`` bypass ``cfg.data`` (tests, notebooks).
    """
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        log(line)
        logf.write(line + "\n")
        logf.flush()

    if train_cases is not None:
        val_cases = list(val_cases or train_cases)
    elif cfg.data == "phantom":
        train_cases = load_cases(cfg, cfg.seeds, say)
        val_cases = load_cases(cfg, cfg.val_seeds, say)
    else:  # a VerSe layout: the last 10 % of cases (at least one) validate
        cases = load_cases(cfg, (), say)
        n_val = max(1, len(cases) // 10) if len(cases) > 1 else 0
        train_cases, val_cases = cases[: len(cases) - n_val], cases[len(cases) - n_val:] or cases
    extra = extra_cases(cfg, say)
    if extra:
        train_cases = list(train_cases) + extra
    val_groups = {"phantom": list(val_cases)}
    if cfg.val_synth_cases:
        val_groups["synth"] = synth_validation_cases(cfg, say)
    torch.manual_seed(cfg.seed)
    device = train_device(cfg.device)
    model = build_model(cfg).to(device)
    if cfg.init_from and not (cfg.resume and (out / "last.pt").exists()):
        init_localization(model, cfg.init_from, say)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    if cfg.schedule not in ("plateau", "cosine"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=cfg.plateau_factor,
                                                       patience=cfg.plateau_patience)
    sigma_vox = cfg.sigma_mm / cfg.spacing_mm
    sampler = PatchSampler(train_cases, cfg.patch, sigma_vox, cfg.seed, rotate_deg=cfg.rotate_deg,
                           amplitude=cfg.amplitude)
    start, history, best_score = 0, [], math.inf
    last = out / "last.pt"
    if cfg.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sampler.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, history, best_score = state["iteration"], state["history"], state["best_score"]
        if list(state.get("config", {}).get("val_seeds", cfg.val_seeds)) != list(cfg.val_seeds):
            best_score = math.inf  # another validation set: its scores are not comparable
        if cfg.reset_lr:
            for group in opt.param_groups:
                group["lr"] = cfg.lr
        say(f"resumed from {last} at iteration {start}, lr {opt.param_groups[0]['lr']:.2e}")
    say(f"config {json.dumps(cfg.jsonable())}")
    say(f"{len(train_cases)} training cases, {len(val_cases)} validation cases, "
        f"{sum(p.numel() for p in model.parameters())} parameters")

    def meta(decoder: dict[str, Any]) -> dict[str, Any]:
        return {"spacing_mm": cfg.spacing_mm, "patch": list(cfg.patch), "overlap": cfg.overlap,
                "sigma_mm": cfg.sigma_mm, "amplitude": cfg.amplitude, "threshold": decoder["threshold"],
                "decoder": decoder["decoder"], "levels": [lv.name for lv in LEVELS],
                "variant": cfg.variant, "trained_iterations": it, "data": cfg.data,
                "train_seeds": list(cfg.seeds) if cfg.data == "phantom" else None,
                **({} if cfg.relabel is None else {"relabel": bool(cfg.relabel)})}

    t0 = time.time()
    it = start
    running = None
    model.train()
    while it < cfg.iterations:
        if cfg.schedule == "cosine":
            # progress: the larger of the iteration and the time-budget fractions, so the
            # annealing ends with the run whichever limit stops it
            progress = (it - start) / max(cfg.iterations - start, 1)
            if cfg.time_limit_s:
                progress = max(progress, (time.time() - t0) / cfg.time_limit_s)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, progress)
        x, y = sampler.batch(cfg.batch)
        loss = train_step(model, opt, x, y, lambda p, t: heatmap_loss(p, t, cfg.fg_weight), device, cfg.clip)
        it += 1
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        elapsed = time.time() - t0
        if it % cfg.log_every == 0:
            rate = (it - start) / elapsed
            eta = (cfg.iterations - it) / max(rate, 1e-9)
            say(f"it {it}/{cfg.iterations} loss {running:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{1 / max(rate, 1e-9):.2f} s/it ETA {eta / 60:.1f} min")
        stop = cfg.time_limit_s is not None and elapsed > cfg.time_limit_s
        if it % cfg.val_every == 0 or it == cfg.iterations or stop:
            model.eval()
            v = validate(model, val_cases, cfg, device, groups=val_groups)
            model.train()
            if cfg.schedule == "plateau":
                sched.step(v["score"])
            v.update({"iteration": it, "loss": running, "elapsed_s": round(elapsed, 1)})
            history.append(v)
            say(f"val it {it}: id {v['id_rate']:.3f} err {v['error_mm']:.2f} mm fp {v['fp']} "
                f"{v['decoder']} thr {v['threshold']} score {v['score']:.3f}"
                + "".join(f" | {name} id {g['id_rate']:.3f} fp {g['fp']} score {g['score']:.3f}"
                          for name, g in v.get("groups", {}).items()))
            if v["score"] < best_score:
                best_score = v["score"]
                torch.save(weights_payload(model, BUILDER, meta(v)), out / "best.pt")
                say(f"best so far -> {out / 'best.pt'}")
            torch.save(weights_payload(model, BUILDER, meta(v)), out / "final.pt")
            tmp = out / "last.pt.tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "rng": sampler.rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(), "iteration": it, "history": history,
                        "best_score": best_score, "config": cfg.jsonable()}, tmp)
            tmp.replace(last)
            (out / "history.json").write_text(json.dumps(history, indent=1))
        if stop:
            say(f"time limit reached at iteration {it}")
            break
    logf.close()
    return out / "best.pt"
