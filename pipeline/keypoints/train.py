"""Training of the 2D keypoint M-SCN (paper section 2.3.3; settings of section 3.2).

The network is the localization engineer's dimension-generic M-SCN (:mod:`pipeline.nets.mscn`)
with ``spatial_dims=2``, two input channels (CT, vertebra mask) and six output heatmaps.
Targets: Gaussians (sigma ``sigma_px``, peak ``amplitude``) at the six points; loss Smooth-L1 as
for localization (section 2.2.3). Paper settings kept: clipping 2.0, weight decay 5e-4, plateau
scheduler; Adam instead of SGD at 1e-4 for the CPU budget (docs/archive/model-card-history.md).

Checkpoints are scored by the mean point error of the unjittered planes of the phantom
validation seeds and, with ``val_synth_cases``, of planes of CT synthesised from the train side's
masks with a seed of their own (``val_synth_seed``; each group counts equally): phantom planes
alone reward the phantom's look, which the real anatomy does not share.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.dataset import KeypointSamples, load_keypoint_samples
from pipeline.keypoints.train_config import KpTrainConfig
from pipeline.localization.heatmaps import gaussian_heatmaps
from pipeline.nets.mscn import MSCN
from pipeline.phantom_caches import cached_phantom_samples
from pipeline.seeds import EVALUATION_SEEDS
from pipeline.segmentation.caches import keypoint_cache_path
from pipeline.training import (
    Progress,
    check_synth_validation,
    keep_best,
    make_optimizer,
    optimizer_step,
    resume,
    save_last,
    start_run,
    validation_due,
)


def build_keypoint_model(base: int = 16, depth: int = 4) -> MSCN:
    # GN kernels coarse to fine: the paper's 7 at the coarse levels, 3 at full resolution.
    kernels = (7,) * (depth - 1) + (3,)
    return MSCN(spatial_dims=2, in_channels=2, out_channels=6, base=base, depth=depth,
                gn_kernels=kernels, variant="mscn")


def _targets(points: np.ndarray, size: int, sigma: float, amplitude: float) -> torch.Tensor:
    return torch.stack([gaussian_heatmaps((size, size), p, sigma, amplitude) for p in points])


@torch.no_grad()
def validate(model: torch.nn.Module, val: KeypointSamples, spacing_mm: float, batch: int = 32) -> dict[str, float]:
    """Mean keypoint error (mm) and mean absolute height error (mm) on the unjittered planes."""
    from pipeline.localization.heatmaps import channel_peaks

    model.eval()
    errs, herrs = [], []
    for i in range(0, len(val.inputs), batch):
        x = torch.from_numpy(val.inputs[i:i + batch].astype(np.float32))
        if not getattr(model, "use_mask", True):
            x[:, 1] = 0.0
        hm = model(x).numpy()
        for h, gt in zip(hm, val.points[i:i + batch]):
            pred, _ = channel_peaks(h)
            errs.append(np.linalg.norm(pred - gt, axis=1).mean() * spacing_mm)
            for a, b in ((0, 1), (2, 3), (4, 5)):
                herrs.append(abs(np.linalg.norm(pred[a] - pred[b]) - np.linalg.norm(gt[a] - gt[b])) * spacing_mm)
    model.train()
    return {"point_error_mm": float(np.mean(errs)), "height_error_mm": float(np.mean(herrs))}


def unjittered(samples: KeypointSamples) -> KeypointSamples:
    """The first (unjittered) plane of each vertebra: samples come ``n_aug`` per vertebra."""
    first = np.r_[True, samples.names[1:] != samples.names[:-1]]
    return KeypointSamples(samples.inputs[first], samples.points[first], samples.grades[first],
                           samples.names[first])


def validate_groups(model: torch.nn.Module, groups: dict[str, KeypointSamples],
                    spacing_mm: float) -> dict:
    """:func:`validate` per group; ``point_error_mm`` and ``height_error_mm`` are the means over
    the groups (each counts equally), ``groups`` holds each group's own figures."""
    per = {name: validate(model, val, spacing_mm) for name, val in groups.items()}
    return {key: float(np.mean([g[key] for g in per.values()]))
            for key in ("point_error_mm", "height_error_mm")} | {"groups": per}


def synth_validation_planes(cfg: KpTrainConfig, cache: Path, say) -> KeypointSamples:
    """Unjittered planes of ``cfg.val_synth_cases`` cases synthesised from the train side's
    masks with the seed ``cfg.val_synth_seed`` (never the training planes' seed)."""
    from pipeline.keypoints.real_samples import cached_synth_keypoint_samples

    planes = unjittered(cached_synth_keypoint_samples(Path(cfg.synth_from), cache,
                                                      cfg.val_synth_cases, cfg.real_aug,
                                                      cfg.val_synth_seed, say))
    say(f"{len(planes.inputs)} synthesised validation planes (seed {cfg.val_synth_seed})")
    return planes


def train(cfg: KpTrainConfig, log=None) -> Path:
    from pipeline.keypoints.plane import PLANE_SPACING_MM

    if cfg.val_synth_cases:              # refused before any phantom is generated
        check_synth_validation(cfg.synth_from, cfg.seed, cfg.val_synth_seed, "planes")
    out, say = start_run(cfg, log, EVALUATION_SEEDS)
    cache = Path(cfg.cache_dir)
    # Generating a phantom writes both models' samples; reuse the segmentation cache.
    missing = [s for s in cfg.train_seeds + cfg.val_seeds
               if not keypoint_cache_path(cache, s, cfg.phantom_spacing_mm).exists()]
    if missing:
        cached_phantom_samples(missing, cache, cfg.phantom_spacing_mm, say)
    tr = load_keypoint_samples([keypoint_cache_path(cache, s, cfg.phantom_spacing_mm) for s in cfg.train_seeds])
    va = load_keypoint_samples([keypoint_cache_path(cache, s, cfg.phantom_spacing_mm) for s in cfg.val_seeds])
    # Validation: only the unjittered plane of each vertebra (every n_aug-th sample, its first).
    groups = {"phantom": unjittered(va)}
    if cfg.val_synth_cases:
        groups["synth"] = synth_validation_planes(cfg, cache, say)
    if cfg.real_data:
        from pipeline.keypoints.real_samples import cached_real_keypoint_samples

        real = cached_real_keypoint_samples(Path(cfg.real_data), cache, cfg.real_aug, cfg.seed, say)
        say(f"{len(real.inputs)} real planes ({cfg.real_data}), each drawn {cfg.real_repeat}x")
        tr = KeypointSamples.concat([tr] + [real] * cfg.real_repeat)
    if cfg.synth_from:
        from pipeline.keypoints.real_samples import cached_synth_keypoint_samples

        synth = cached_synth_keypoint_samples(Path(cfg.synth_from), cache, cfg.synth_cases,
                                              cfg.real_aug, cfg.seed, say)
        say(f"{len(synth.inputs)} planes of CT synthesised from the masks of {cfg.synth_from}")
        tr = KeypointSamples.concat([tr, synth])
    say(f"{len(tr.inputs)} training planes, "
        + ", ".join(f"{len(g.inputs)} {name} validation planes" for name, g in groups.items()))
    size = tr.inputs.shape[-1]

    model = build_keypoint_model(cfg.base, cfg.depth)
    model.use_mask = cfg.use_mask
    if cfg.init_from:
        model.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=False)["state_dict"])
        say(f"initialised from {cfg.init_from}")
    frac_idx = np.nonzero(tr.grades > 0)[0]
    norm_idx = np.nonzero(tr.grades == 0)[0]
    say(f"{len(frac_idx)} planes of fractured vertebrae, drawn at {cfg.fracture_share:.0%} of each batch")
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    ckpt = out / "last.ckpt"
    step, best = resume(ckpt, model, opt, sched, rng, say)
    model.train()
    progress = Progress(say, cfg.steps, step, every=20, digits=5, max_minutes=cfg.max_minutes)
    while step < cfg.steps:
        n_fr = int(rng.binomial(cfg.batch, cfg.fracture_share)) if len(frac_idx) else 0
        idx = np.concatenate([rng.choice(frac_idx, n_fr), rng.choice(norm_idx, cfg.batch - n_fr)]).astype(int)
        x = torch.from_numpy(tr.inputs[idx].astype(np.float32))
        # Intensity jitter of the CT channel only (the mask channel is a probability).
        x[:, 0] = x[:, 0] * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
        if not cfg.use_mask:
            x[:, 1] = 0.0
        t = _targets(tr.points[idx], size, cfg.sigma_px, cfg.amplitude)
        loss = F.smooth_l1_loss(model(x), t)
        optimizer_step(model, opt, loss, cfg.clip)
        step += 1
        progress.update(step, loss)
        last = step == cfg.steps
        timed_out = progress.timed_out()
        if validation_due(step, cfg.val_every, cfg.steps, timed_out):
            v = validate_groups(model, groups, PLANE_SPACING_MM)
            sched.step(v["point_error_mm"])
            say(f"val step {step}: point error {v['point_error_mm']:.3f} mm, height error "
                f"{v['height_error_mm']:.3f} mm, lr {opt.param_groups[0]['lr']:.2e}"
                + ("".join(f" | {name} {g['point_error_mm']:.3f} / {g['height_error_mm']:.3f} mm"
                           for name, g in v["groups"].items()) if len(groups) > 1 else ""))
            best = keep_best(v["point_error_mm"], best, out / "best.pt", model, step, v, cfg)
        if step % cfg.ckpt_every == 0 or last or timed_out:
            save_last(ckpt, model, opt, sched, step, best, rng)
        if timed_out:
            say(f"stopping at step {step}: time limit of {cfg.max_minutes} min")
            break
    return out / "best.pt"


def install(best: Path, half: bool = False) -> Path:
    """Install a ``best.pt`` as the shipped ``keypoints`` weights (registry + manifest)."""
    from pipeline.keypoints.plane import PLANE_SIZE, PLANE_SPACING_MM
    from pipeline.nets.mscn import build_mscn
    from pipeline.registry import install_weights, weights_payload

    ck = torch.load(best, map_location="cpu", weights_only=False)
    model = build_mscn(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    meta = {"plane_size": PLANE_SIZE, "plane_spacing_mm": PLANE_SPACING_MM, "keypoints": list(KEYPOINT_NAMES),
            "use_mask": bool(ck["train"].get("use_mask", True)),
            "step": ck.get("step"), "val": ck.get("val"), "train_seeds": ck["train"]["train_seeds"],
            "val_seeds": ck["train"]["val_seeds"]}
    tmp = Path(best).with_name("keypoints.pt")
    torch.save(weights_payload(model, "pipeline.nets.mscn:build_mscn", meta, half=half), tmp)
    return install_weights("keypoints", tmp, trained_steps=ck.get("step"))
