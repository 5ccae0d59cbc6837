"""Training of the segmentation 3D U-Net (paper section 2.3.1-2.3.2, eq. 12-13; section 3.2).

Loss (eq. 13): soft Dice over the two vertebra classes (smoothing 1e-5) + cross-entropy, on soft
(partial-volume) targets. Paper settings kept: gradient clipping 2.0, weight decay 5e-4, plateau
scheduler, clamp + z-score, random flip/translation. Changed, and why (docs/archive/model-card-history.md):
- optimizer Adam (lr 1e-3) instead of SGD lr 1e-4: SGD at 1e-4 does not leave the all-background
  solution within the few thousand steps a 2-core CPU affords;
- batch 2 instead of 4, crops 64^3 at 2 mm instead of 128^3 at 1 mm (same 128 mm field, an
  eighth of the voxels: about four times faster per step on a CPU). ``crop_size`` and
  ``crop_spacing_mm`` train another geometry (the paper's 128 at 1 mm, on a GPU); the geometry
  goes with the weights (``meta``), and inference crops as they say.

Checkpoints (``last.ckpt``) make the run resumable; progress with ETA goes to ``log.txt``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.phantom_caches import cached_phantom_samples
from pipeline.seeds import EVALUATION_SEEDS
from pipeline.segmentation.dataset import augmented_batch
from pipeline.segmentation.infer import CROP_SIZE, crop_geometry
from pipeline.segmentation.model import UNet3D
from pipeline.segmentation.train_config import SegTrainConfig
from pipeline.training import (
    LrSchedule,
    Progress,
    batches,
    check_synth_validation,
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

DICE_EPS = 1e-5


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 13: ``1 - (2|p.y| + eps)/(|p|^2 + |y|^2 + eps)`` over classes 1-2, plus cross-entropy."""
    p = torch.softmax(logits, dim=1)
    dims = (0, 2, 3, 4)
    inter = (p * target).sum(dims)[1:]
    den = (p * p).sum(dims)[1:] + (target * target).sum(dims)[1:]
    dice = 1.0 - (2 * inter + DICE_EPS) / (den + DICE_EPS)
    # Fractured class absent from the batch: its Dice term is 1 - eps/(|p|^2 + eps), which only
    # pushes its probability down; keep it (it is what tells normal from fractured).
    ce = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    return dice.mean() + ce


@torch.no_grad()
def validate(model: torch.nn.Module, val, batch: int = 2, device: torch.device | None = None,
             size: int = CROP_SIZE) -> dict[str, float]:
    """Loss, hard Dice of the vertebra and fracture accuracy on unaugmented, centred crops
    (in float32 on ``device``, whatever the training's autocasting)."""
    model.eval()
    device = device or torch.device("cpu")
    rng = np.random.default_rng(0)
    losses, dices, correct = [], [], 0
    for i in range(0, len(val), batch):
        chunk = val[i:i + batch]
        x, t = augmented_batch(chunk, rng, size=size, shift=False, flip=False, intensity=False)
        logits = model(torch.from_numpy(x).to(device)).float().cpu()
        losses.append(float(dice_ce_loss(logits, torch.from_numpy(t))))
        p = torch.softmax(logits, 1).numpy()
        for k, s in enumerate(chunk):
            fg = p[k, 1] + p[k, 2] > 0.5
            gt = t[k, 1] + t[k, 2] > 0.5
            dices.append(2 * (fg & gt).sum() / max(fg.sum() + gt.sum(), 1))
            score = p[k, 2][fg].sum() / max((p[k, 1] + p[k, 2])[fg].sum(), 1e-6)
            correct += int((score > 0.5) == s.fractured)
    model.train()
    return {"loss": float(np.mean(losses)), "dice": float(np.mean(dices)), "fracture_acc": correct / len(val)}


def validate_groups(model: torch.nn.Module, groups: dict[str, list], device: torch.device | None = None,
                    size: int = CROP_SIZE) -> dict:
    """:func:`validate` on each group of validation crops (name -> crops); with more than one,
    the loss and Dice are the means of the groups' (each group counts equally), the fracture
    accuracy the first group's, and every group's figures are under ``groups``."""
    per = {name: validate(model, crops, device=device, size=size) for name, crops in groups.items()}
    if len(per) == 1:
        return next(iter(per.values()))
    first = next(iter(per.values()))
    return {"loss": float(np.mean([g["loss"] for g in per.values()])),
            "dice": float(np.mean([g["dice"] for g in per.values()])),
            "fracture_acc": first["fracture_acc"], "groups": per}


def synth_validation_samples(cfg: SegTrainConfig, cache: Path, say) -> list:
    """Validation crops synthesised from the train side's masks (``cfg.val_synth_cases`` cases,
    seed ``cfg.val_synth_seed``, never the training crops' seed)."""
    from pipeline.synthesis.seg_source import cached_synth_samples, find_masks, training_subjects

    check_synth_validation(cfg.synth_real_dir, cfg.seed, cfg.val_synth_seed, "crops")
    crops = cached_synth_samples(find_masks(cfg.synth_real_dir, training_subjects()), cfg.val_synth_cases,
                                 cache, seed=cfg.val_synth_seed, crop_size=cfg.crop_size,
                                 crop_spacing_mm=cfg.crop_spacing_mm, workers=cfg.workers, log=say)
    say(f"{len(crops)} synthesised validation crops (seed {cfg.val_synth_seed})")
    return crops


def train(cfg: SegTrainConfig, log=None) -> Path:
    """Train (or resume) and return the path of the best checkpoint."""
    LrSchedule.check(cfg.schedule)
    previous = Path(cfg.out_dir) / "config.json"
    old_val = json.loads(previous.read_text()).get("val_seeds") if previous.exists() else None
    device = train_device(cfg.device)
    out, say = start_run(cfg, log, EVALUATION_SEEDS)
    cache = Path(cfg.cache_dir)
    geo = {"crop_size": cfg.crop_size, "crop_spacing_mm": cfg.crop_spacing_mm}
    train_s = cached_phantom_samples(cfg.train_seeds, cache, cfg.phantom_spacing_mm, say, cfg.workers, **geo)
    val_s = cached_phantom_samples(cfg.val_seeds, cache, cfg.phantom_spacing_mm, say, cfg.workers, **geo)
    n_frac = sum(s.fractured for s in train_s)
    say(f"{len(train_s)} training crops ({n_frac} fractured), {len(val_s)} validation crops")
    real_s = []
    if cfg.real_data:
        from pipeline.realdata.samples import cached_real_samples, training_cases

        key, cases = training_cases(Path(cfg.real_data))
        real_s = cached_real_samples(cases, key, cache, cfg.crop_size, cfg.crop_spacing_mm, say)
        say(f"{len(real_s)} real training crops from {cfg.real_data} ({key}), "
            f"{cfg.real_fraction:.0%} of each batch")

    model = UNet3D(base=cfg.base, depth=cfg.depth)
    model.to(device)
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, "sgd" if cfg.optimizer == "sgd" else "adamw")
    rng = np.random.default_rng(cfg.seed)
    ckpt = out / "last.ckpt"
    step, best = resume(ckpt, model, opt, sched, rng, say)
    schedule = LrSchedule(cfg.schedule, cfg.lr, opt, sched)
    if step == 0 and cfg.init_from == "shipped":
        _init_from_shipped(model, say)
    elif step == 0 and cfg.init_from:
        init_from(model, cfg.init_from, say)
    if step and old_val is not None and list(old_val) != list(cfg.val_seeds):
        best = math.inf   # another validation set: the old best loss is not comparable
        say(f"validation seeds changed ({old_val} -> {cfg.val_seeds}): best.pt is replaced at the next validation")
    schedule.resumed(step, cfg.reset_lr, say)
    # Fractured crops are a minority: sample them at up to a third of each batch.
    synth_pool = None
    if cfg.synth_real_dir and cfg.synth_fraction > 0:
        from pipeline.synthesis.seg_source import MixedPools, cached_synth_samples, find_masks, training_subjects

        synth_s = cached_synth_samples(find_masks(cfg.synth_real_dir, training_subjects()),
                                       cfg.synth_cases, cache, seed=cfg.seed,
                                       crop_size=cfg.crop_size, crop_spacing_mm=cfg.crop_spacing_mm,
                                       workers=cfg.workers, log=say)
        synth_pool = MixedPools([], synth_s, 1.0)   # keeps the fractured share
        say(f"{len(synth_s)} synthesised crops from the real masks of {cfg.synth_real_dir}, "
            f"{cfg.synth_fraction:.0%} of each batch")
    val_groups = {"phantom": val_s}
    if cfg.val_synth_cases:
        val_groups["synth"] = synth_validation_samples(cfg, cache, say)
    frac_idx = [i for i, s in enumerate(train_s) if s.fractured]
    norm_idx = [i for i, s in enumerate(train_s) if not s.fractured]
    model.train()
    progress = Progress(say, cfg.steps, step, every=10 if device.type == "cpu" else 100, digits=4,
                        max_minutes=cfg.max_minutes)

    def make_batch():
        chosen = []
        for _ in range(cfg.batch):
            if synth_pool and rng.random() < cfg.synth_fraction:
                chosen.append(synth_pool.pick(rng))
                continue
            if real_s and rng.random() < cfg.real_fraction:
                chosen.append(real_s[int(rng.integers(len(real_s)))])
                continue
            pool = frac_idx if (frac_idx and rng.random() < 0.33) else norm_idx or frac_idx
            chosen.append(train_s[pool[int(rng.integers(len(pool)))]])
        return augmented_batch(chosen, rng, size=cfg.crop_size)

    feed = batches(make_batch, device)
    while step < cfg.steps:
        schedule.before_step(progress, step)
        x, t = next(feed)
        loss = train_step(model, opt, x, t, dice_ce_loss, device, cfg.clip)
        step += 1
        progress.update(step, loss)
        last = step == cfg.steps
        timed_out = progress.timed_out()
        if validation_due(step, cfg.val_every, cfg.steps, timed_out):
            v = validate_groups(model, val_groups, device=device, size=cfg.crop_size)
            schedule.validated(v["loss"])
            say(f"val step {step}: loss {v['loss']:.4f} dice {v['dice']:.4f} "
                f"fracture acc {v['fracture_acc']:.3f} lr {opt.param_groups[0]['lr']:.2e}"
                + "".join(f" | {name} loss {g['loss']:.4f} dice {g['dice']:.4f}"
                          for name, g in v.get("groups", {}).items()))
            best = keep_best(v["loss"], best, out / "best.pt", model, step, v, cfg)
        if step % cfg.ckpt_every == 0 or last or timed_out:
            save_last(ckpt, model, opt, sched, step, best, rng)
        if timed_out:
            say(f"stopping at step {step}: time limit of {cfg.max_minutes} min")
            break
    feed.close()
    return out / "best.pt"


def _init_from_shipped(model: torch.nn.Module, say) -> None:
    """Start from the installed segmentation's 2 mm network (fine-tuning it, e.g. on real CT)."""
    from pipeline.registry import load_model

    shipped = load_model("segmentation", "cpu")
    if shipped.config["coarse"] != model.config:
        raise ValueError(f"--init-from shipped: the installed network {shipped.config['coarse']} "
                         f"is not {model.config}")
    model.load_state_dict(shipped.coarse.state_dict())
    say(f"initialised from the installed segmentation network (step {shipped.meta.get('step')})")


def candidate_model(segmentation: Path | None, refiner: str | None):
    """The segmentation model to measure instead of the installed one: a 2 mm network's
    ``best.pt`` and/or a refiner's ``best.pt`` or ``"none"`` (no refiner), the rest shipped
    (:func:`assemble`); its ``meta`` attached. ``FileNotFoundError`` for a missing refiner."""
    none = refiner is not None and refiner.lower() == "none"
    if refiner is not None and not none and not Path(refiner).is_file():
        raise FileNotFoundError(f"--refiner {refiner}: no such file (or 'none')")
    model, meta = assemble(segmentation, None if none or refiner is None else Path(refiner),
                           drop_refiner=none)
    model.meta = meta
    return model.eval()


def assemble(best: Path | None, refiner: Path | None = None, drop_refiner: bool = False,
             weights_dir: Path | None = None):
    """A :class:`~pipeline.segmentation.model.SegmentationModel` and its ``meta`` from a 2 mm network
    ``best.pt`` and/or a refiner ``best.pt`` (:mod:`pipeline.segmentation.train_refiner`).

    The part not given is taken from the shipped weights (a refiner trained on simulated priors
    is independent of the 2 mm network; one trained on a network's own priors, ``--prior
    coarse``, belongs to that network: a warning says when they are assembled apart);
    ``drop_refiner`` leaves the refiner out.
    """
    from pipeline.registry import WEIGHTS_DIR, load_model, read_manifest
    from pipeline.segmentation.model import SegmentationModel

    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    shipped = load_model("segmentation", "cpu", wdir) if "segmentation" in read_manifest(wdir) else None
    if best is not None:
        ck = torch.load(best, map_location="cpu", weights_only=False)
        coarse_cfg, coarse_state = ck["config"], ck["state_dict"]
        coarse_meta = {"step": ck.get("step"), "val": ck.get("val"), "train_seeds": ck["train"]["train_seeds"],
                       "val_seeds": ck["train"]["val_seeds"]}
        coarse_meta.update(zip(("crop_size", "crop_spacing_mm"), crop_geometry(ck["train"])))
    elif shipped is not None:
        coarse_cfg, coarse_state = shipped.config["coarse"], shipped.coarse.state_dict()
        coarse_meta = {k: shipped.meta.get(k) for k in ("step", "val", "train_seeds", "val_seeds")}
        coarse_meta.update(zip(("crop_size", "crop_spacing_mm"), crop_geometry(shipped.meta)))
    else:
        raise ValueError("no 2 mm network installed: install one before its refiner")
    ref_cfg = ref_state = ref_meta = None
    if refiner is not None:
        rk = torch.load(refiner, map_location="cpu", weights_only=False)
        ref_cfg, ref_state = rk["config"], rk["state_dict"]
        ref_meta = {"step": rk.get("step"), "val": rk.get("val"), "train_seeds": rk["train"]["train_seeds"],
                    "prior": rk["train"].get("prior", "simulated"),
                    "coarse_network": (rk.get("val") or {}).get("coarse_network")}
    elif not drop_refiner and shipped is not None and shipped.refiner is not None:
        ref_cfg, ref_state = shipped.config["refiner"], shipped.refiner.state_dict()
        ref_meta = shipped.meta.get("refiner")
    model = SegmentationModel(coarse_cfg, ref_cfg)
    model.coarse.load_state_dict(coarse_state)
    trained_on = (ref_meta or {}).get("coarse_network")
    if trained_on:
        import warnings

        from pipeline.segmentation.coarse_prior import network_tag

        if network_tag(model.coarse) != trained_on:
            warnings.warn(f"the refiner was trained on the output of 2 mm network {trained_on}, not of this "
                          f"one ({network_tag(model.coarse)}): train it again on this network's priors "
                          "(spine-node train refiner --prior coarse)", stacklevel=2)
    if ref_state is not None:
        model.refiner.load_state_dict(ref_state)
    meta = {"classes": ["background", "normal", "fractured"], **coarse_meta, "refiner": ref_meta}
    return model, meta


def install(best: Path | None, refiner: Path | None = None, half: bool = False,
            weights_dir: Path | None = None) -> Path:
    """Install a 2 mm network ``best.pt`` and/or a refiner ``best.pt`` as the shipped
    ``segmentation`` weights; the part not given is kept from the shipped weights (:func:`assemble`)."""
    from pipeline.registry import WEIGHTS_DIR, install_weights, weights_payload

    if best is None and refiner is None:
        raise ValueError("nothing to install: give the 2 mm network's or the refiner's best.pt")
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    model, meta = assemble(best, refiner, weights_dir=wdir)
    tmp = Path(refiner if best is None else best).with_name("segmentation.pt")
    torch.save(weights_payload(model, "pipeline.segmentation.model:build_segmentation", meta, half=half), tmp)
    return install_weights("segmentation", tmp, wdir, trained_steps=meta.get("step"))
