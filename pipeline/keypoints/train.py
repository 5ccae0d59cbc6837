"""Training of the 2D keypoint M-SCN (paper section 2.3.3; settings of section 3.2).

The network is the localization engineer's dimension-generic M-SCN (:mod:`pipeline.nets.mscn`)
with ``spatial_dims=2``, two input channels (CT, vertebra mask) and six output heatmaps.
Targets: Gaussians (sigma ``sigma_px``, peak ``amplitude``) at the six points; loss Smooth-L1 as
for localization (section 2.2.3). Paper settings kept: clipping 2.0, weight decay 5e-4, plateau
scheduler; Adam instead of SGD at 1e-4 for the CPU budget (MODEL_CARD.md).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.findings import KEYPOINT_NAMES
from pipeline.keypoints.dataset import KeypointSamples, load_keypoint_samples
from pipeline.localization.heatmaps import gaussian_heatmaps
from pipeline.nets.mscn import MSCN
from pipeline.segmentation.dataset import EVALUATION_SEEDS, cached_phantom_samples, keypoint_cache_path


@dataclass
class KpTrainConfig:
    out_dir: str = "runs/keypoints"
    train_seeds: list[int] = field(default_factory=lambda: list(range(100, 124)))
    val_seeds: list[int] = field(default_factory=lambda: [8001, 8002])
    cache_dir: str = "runs/cache"
    phantom_spacing_mm: float | None = None
    steps: int = 3000
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 5e-4
    clip: float = 2.0
    base: int = 16
    depth: int = 4
    sigma_px: float = 2.0
    amplitude: float = 10.0
    seed: int = 0
    threads: int = 1
    val_every: int = 200
    ckpt_every: int = 100
    max_minutes: float | None = None
    fracture_share: float = 0.3          # share of each batch drawn from fractured vertebrae
    init_from: str | None = None         # start from these weights (a best.pt), e.g. to fine-tune
    use_mask: bool = True                # False: the mask channel is zeroed (CT only)


def build_keypoint_model(base: int = 16, depth: int = 4) -> MSCN:
    # GN kernels coarse to fine: the paper's 7 at the coarse levels, 3 at full resolution.
    kernels = (7,) * (depth - 1) + (3,)
    return MSCN(spatial_dims=2, in_channels=2, out_channels=6, base=base, depth=depth,
                gn_kernels=kernels, variant="mscn")


def _targets(points: np.ndarray, size: int, sigma: float, amplitude: float) -> torch.Tensor:
    return torch.stack([gaussian_heatmaps((size, size), p, sigma, amplitude) for p in points])


def _log(out_dir: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(out_dir / "log.txt", "a") as fh:
        fh.write(line + "\n")


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


def train(cfg: KpTrainConfig, log=None) -> Path:
    from pipeline.keypoints.plane import PLANE_SPACING_MM

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda m: _log(out, m))
    bad = set(cfg.train_seeds + cfg.val_seeds) & set(EVALUATION_SEEDS)
    if bad:
        raise ValueError(f"seeds {sorted(bad)} are evaluation seeds (9001-9010)")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    cache = Path(cfg.cache_dir)
    # Generating a phantom writes both models' samples; reuse the segmentation cache.
    missing = [s for s in cfg.train_seeds + cfg.val_seeds
               if not keypoint_cache_path(cache, s, cfg.phantom_spacing_mm).exists()]
    if missing:
        cached_phantom_samples(missing, cache, cfg.phantom_spacing_mm, say)
    tr = load_keypoint_samples([keypoint_cache_path(cache, s, cfg.phantom_spacing_mm) for s in cfg.train_seeds])
    va = load_keypoint_samples([keypoint_cache_path(cache, s, cfg.phantom_spacing_mm) for s in cfg.val_seeds])
    # Validation: only the unjittered plane of each vertebra (every n_aug-th sample, its first).
    first = np.r_[True, va.names[1:] != va.names[:-1]]
    va = KeypointSamples(va.inputs[first], va.points[first], va.grades[first], va.names[first])
    say(f"{len(tr.inputs)} training planes, {len(va.inputs)} validation planes")
    size = tr.inputs.shape[-1]

    model = build_keypoint_model(cfg.base, cfg.depth)
    model.use_mask = cfg.use_mask
    if cfg.init_from:
        model.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=False)["state_dict"])
        say(f"initialised from {cfg.init_from}")
    frac_idx = np.nonzero(tr.grades > 0)[0]
    norm_idx = np.nonzero(tr.grades == 0)[0]
    say(f"{len(frac_idx)} planes of fractured vertebrae, drawn at {cfg.fracture_share:.0%} of each batch")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
    step, best = 0, math.inf
    rng = np.random.default_rng(cfg.seed)
    ckpt = out / "last.ckpt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
        step, best = st["step"], st["best"]
        rng.bit_generator.state = st["rng"]
        say(f"resumed at step {step}")
    model.train()
    t0, s0, running = time.time(), step, []
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
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        step += 1
        running.append(float(loss.detach()))
        if step % 20 == 0:
            rate = (time.time() - t0) / (step - s0)
            say(f"step {step}/{cfg.steps} loss {np.mean(running[-20:]):.5f} {rate:.2f} s/step "
                f"ETA {(cfg.steps - step) * rate / 60:.1f} min")
        last = step == cfg.steps
        timed_out = cfg.max_minutes is not None and (time.time() - t0) / 60 > cfg.max_minutes
        if step % cfg.val_every == 0 or last or timed_out:
            v = validate(model, va, PLANE_SPACING_MM)
            sched.step(v["point_error_mm"])
            say(f"val step {step}: point error {v['point_error_mm']:.3f} mm, height error "
                f"{v['height_error_mm']:.3f} mm, lr {opt.param_groups[0]['lr']:.2e}")
            if v["point_error_mm"] < best:
                best = v["point_error_mm"]
                torch.save({"config": model.config, "state_dict": model.state_dict(), "step": step,
                            "val": v, "train": asdict(cfg)}, out / "best.pt")
        if step % cfg.ckpt_every == 0 or last or timed_out:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "best": best, "rng": rng.bit_generator.state}, ckpt)
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


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in KpTrainConfig.__dataclass_fields__.values():
        if f.name in ("train_seeds", "val_seeds", "init_from"):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=str)
        elif isinstance(f.default, bool):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=lambda v: v.lower() in ("1", "true", "yes"))
        else:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.default is not None else float)
    a = vars(ap.parse_args())
    cfg = KpTrainConfig()
    for k, v in a.items():
        if v is None:
            continue
        if k.endswith("seeds"):
            from pipeline.evaluate import parse_seeds

            v = parse_seeds(v)
        setattr(cfg, k, v)
    train(cfg)


if __name__ == "__main__":
    main()
