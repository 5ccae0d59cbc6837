"""Training of the 1 mm boundary refiner (:mod:`pipeline.segmentation.refine`).

Loss: binary cross-entropy + soft Dice on the occupancy target (eq. 13 with one foreground
class). Adam, clipping 2.0, weight decay 5e-4, plateau scheduler (or cosine annealing); patches
of 40^3 at 1 mm near the surface, left-right flip, HU gain/offset. The coarse prior is simulated
from the truth (``prior="simulated"``), or the shipped 2 mm network's own output
(``prior="coarse"``: :mod:`pipeline.segmentation.coarse_prior`, patches half on its errors).

Each phantom's 1 mm crops (one per whole vertebra) are generated once and cached under
``cache_dir`` as ``ref-phantom-<seed>-acq.npz``; ``last.ckpt`` makes the run resumable (the
formats of :mod:`pipeline.training`). Command: ``spine-node train refiner``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.seeds import EVALUATION_SEEDS, refuse_evaluation_seeds
from pipeline.segmentation.caches import refine_cache_path
from pipeline.segmentation.model import ShallowRefiner
from pipeline.segmentation.refine_training import error_points, refine_batch, surface_points
from pipeline.segmentation.train_config import RefineTrainConfig
from pipeline.training import (
    LrSchedule,
    Progress,
    batches,
    generate_parallel,
    init_from,
    keep_best,
    make_optimizer,
    resume,
    save_last,
    start_run,
    train_device,
    train_step,
    validation_due,
)


def phantom_refine_samples(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm crops of phantom ``seed`` on its acquisition grid (whole vertebrae only)."""
    from pipeline.phantom import generate
    from pipeline.segmentation.refine_training import refine_samples

    refuse_evaluation_seeds([seed])
    ph = generate(seed)
    return refine_samples(ph.ct, ph.labels, [v for v in ph.gt["vertebrae"] if not v.get("partial")])


def write_refine_cache(seed: int, cache_dir: Path) -> Path:
    """Generate phantom ``seed`` once and write its 1 mm crops."""
    path = refine_cache_path(cache_dir, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    ct, occ = phantom_refine_samples(seed)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ct=ct, occ=occ)
    tmp.replace(path)
    return path


def load_refine(cache_dir: Path, seeds, log=print, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The cached crops of ``seeds`` (each phantom generated and cached on first use, the missing
    ones by ``workers`` processes)."""
    from functools import partial

    seeds = list(seeds)
    missing = [s for s in seeds if not refine_cache_path(cache_dir, s).exists()]
    generate_parallel(missing, partial(write_refine_cache, cache_dir=Path(cache_dir)), workers, log)
    cts, occs = [], []
    for seed in seeds:
        with np.load(refine_cache_path(cache_dir, seed)) as z:
            cts.append(z["ct"])
            occs.append(z["occ"])
    return np.concatenate(cts), np.concatenate(occs)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1e-5) / ((p * p).sum() + (target * target).sum() + 1e-5)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


def train(cfg: RefineTrainConfig, log=None) -> Path:
    LrSchedule.check(cfg.schedule)
    device = train_device(cfg.device)
    out, say = start_run(cfg, log, EVALUATION_SEEDS, "evaluation seeds (9001-9010) are not for training")
    cts, occs = load_refine(Path(cfg.cache_dir), cfg.train_seeds, say, cfg.workers)
    vcts, voccs = load_refine(Path(cfg.cache_dir), cfg.val_seeds, say, cfg.workers)
    say(f"{len(cts)} training crops, {len(vcts)} validation crops")
    if cfg.prior not in ("simulated", "coarse"):
        raise ValueError(f"prior {cfg.prior!r}: simulated or coarse")
    coarse = coarse_tag = None
    priors = vpriors = errors = verrors = None
    if cfg.prior == "coarse":
        coarse, coarse_tag = coarse_network(cfg)
        priors, vpriors = phantom_coarse_priors(cfg, coarse, say)
    if cfg.real_data:
        from pipeline.realdata.samples import real_cascade_priors, real_refine_samples, training_cases

        key, cases = training_cases(Path(cfg.real_data))
        rcts, roccs = real_refine_samples(cases(), Path(cfg.cache_dir), key, say)
        cts = np.concatenate([cts] + [rcts] * cfg.real_repeat)
        occs = np.concatenate([occs] + [roccs] * cfg.real_repeat)
        if coarse is not None:
            rpriors = real_cascade_priors(cases(), Path(cfg.cache_dir), key, coarse, say)
            priors = np.concatenate([priors] + [rpriors] * cfg.real_repeat)
        say(f"{len(rcts)} real training crops from {cfg.real_data} ({key}), each x{cfg.real_repeat}")
    if cfg.synth_from:
        from pipeline.segmentation.refine_synth import cached_synth_refine_samples

        exclude = [v for v in str(cfg.synth_exclude).replace(" ", "").split(",") if v]
        scts, soccs, spriors = cached_synth_refine_samples(Path(cfg.synth_from), Path(cfg.cache_dir),
                                                           cfg.synth_cases, cfg.seed, coarse, say,
                                                           exclude)
        cts, occs = np.concatenate([cts, scts]), np.concatenate([occs, soccs])
        if coarse is not None:
            priors = np.concatenate([priors, spriors])
        say(f"{len(scts)} crops of CT synthesised from the masks of {cfg.synth_from}")
    if coarse is not None:
        errors, verrors = error_points(occs, priors), error_points(voccs, vpriors)
    vx, vt = refine_batch(vcts, voccs, np.random.default_rng(123), 16, cfg.patch, priors=vpriors, errors=verrors)
    extra = tuple(int(d) for d in str(cfg.extra_dilations).replace(" ", "").split(",") if d)
    model = ShallowRefiner(in_channels=2, width=cfg.width, extra_dilations=extra).to(device)
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    ckpt = out / "last.ckpt"
    step, best = resume(ckpt, model, opt, sched, rng, say)
    schedule = LrSchedule(cfg.schedule, cfg.lr, opt, sched)
    if step == 0 and cfg.init_from == "shipped":
        from pipeline.registry import load_model

        shipped = load_model("segmentation", "cpu").refiner
        if shipped is None or shipped.config != model.config:
            raise ValueError("--init-from shipped: the installed refiner is not this network "
                             f"({None if shipped is None else shipped.config} vs {model.config})")
        model.load_state_dict(shipped.state_dict())
        say("initialised from the installed refiner")
    elif step == 0 and cfg.init_from:
        base = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        if extra and base["config"] == model.base_config():
            model.load_base(base["state_dict"], base["config"])  # the new layers start at zero
            say(f"initialised from {cfg.init_from} (step {base.get('step')}), extra layers {extra} at zero")
        else:
            init_from(model, cfg.init_from, say)
    schedule.resumed(step, cfg.reset_lr, say)
    progress = Progress(say, cfg.steps, step, every=20 if device.type == "cpu" else 200, digits=4,
                        max_minutes=cfg.max_minutes)
    surfaces = surface_points(occs)
    feed = batches(lambda: refine_batch(cts, occs, rng, cfg.batch, cfg.patch, surfaces=surfaces,
                                        priors=priors, errors=errors), device)
    while step < cfg.steps:
        schedule.before_step(progress, step)
        x, t = next(feed)
        loss = train_step(model, opt, x, t, loss_fn, device, cfg.clip)
        step += 1
        progress.update(step, loss)
        timed_out = progress.timed_out()
        if validation_due(step, cfg.val_every, cfg.steps, timed_out):
            model.eval()
            with torch.no_grad():
                lg = model(torch.from_numpy(vx).to(device)).float().cpu()
                vl = float(loss_fn(lg, torch.from_numpy(vt)))
                p = torch.sigmoid(lg).numpy() > 0.5
                g = vt > 0.5
                prior = vx[:, 1:2] > 0.5
                d = 2 * (p & g).sum() / (p.sum() + g.sum())
                d0 = 2 * (prior & g).sum() / (prior.sum() + g.sum())
            model.train()
            schedule.validated(vl)
            say(f"val step {step}: loss {vl:.4f} patch dice {d:.4f} (prior {d0:.4f})")
            best = keep_best(vl, best, out / "best.pt", model, step,
                             {"loss": vl, "dice": float(d), "prior_dice": float(d0),
                              "coarse_network": coarse_tag}, cfg)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or timed_out:
            save_last(ckpt, model, opt, sched, step, best, rng)
        if timed_out:
            say(f"stopping at step {step}: time limit of {cfg.max_minutes} min")
            break
    feed.close()
    return out / "best.pt"


def coarse_network(cfg: RefineTrainConfig) -> tuple[torch.nn.Module, str]:
    """The 2 mm network whose priors the refiner learns to correct (``cfg.coarse_from``, else
    the shipped one) and its tag (:mod:`pipeline.segmentation.coarse_prior`)."""
    from pipeline.registry import load_model
    from pipeline.segmentation.coarse_prior import network_tag

    coarse = load_coarse(cfg.coarse_from) if cfg.coarse_from else load_model("segmentation", "cpu").coarse
    coarse.eval()
    return coarse, network_tag(coarse)


def phantom_coarse_priors(cfg: RefineTrainConfig, coarse: torch.nn.Module, say
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The network's priors of the phantom training and validation crops."""
    from pipeline.segmentation.coarse_prior import load_cascade, network_tag

    priors = load_cascade(Path(cfg.cache_dir), cfg.train_seeds, coarse, say)
    vpriors = load_cascade(Path(cfg.cache_dir), cfg.val_seeds, coarse, say)
    say(f"coarse priors of network {network_tag(coarse)}: {len(priors)} training, "
        f"{len(vpriors)} validation crops")
    return priors, vpriors


def load_coarse(path: str | Path) -> torch.nn.Module:
    """A 2 mm network from its training run's ``best.pt`` (of the shipped crop geometry: the
    coarse priors are cut from those caches)."""
    from pipeline.segmentation.infer import CROP_SIZE, CROP_SPACING_MM, crop_geometry
    from pipeline.segmentation.model import UNet3D

    ck = torch.load(path, map_location="cpu", weights_only=False)
    geometry = crop_geometry(ck.get("train"))
    if geometry != (CROP_SIZE, CROP_SPACING_MM):
        raise ValueError(f"--coarse-from {path}: crops of {geometry[0]} at {geometry[1]:g} mm; the coarse priors "
                         f"are computed from the {CROP_SIZE} at {CROP_SPACING_MM:g} mm caches only")
    model = UNet3D(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    return model


def install(best: Path, weights_dir: Path | None = None) -> Path:
    """Install a refiner ``best.pt`` into the shipped ``segmentation`` weights, beside the
    shipped 2 mm network (:func:`pipeline.segmentation.train.install`)."""
    from pipeline.segmentation.train import install as install_segmentation

    return install_segmentation(None, refiner=best, weights_dir=weights_dir)
