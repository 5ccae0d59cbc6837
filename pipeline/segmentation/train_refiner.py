"""Training of the 1 mm boundary refiner (:mod:`pipeline.segmentation.refine`).

Loss: binary cross-entropy + soft Dice on the occupancy target (eq. 13 with one foreground
class). Adam, clipping 2.0, weight decay 5e-4, plateau scheduler; patches of 40^3 at 1 mm near
the surface, simulated coarse prior, left-right flip, HU gain/offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.segmentation.dataset import EVALUATION_SEEDS
from pipeline.segmentation.model import ShallowRefiner
from pipeline.segmentation.refine import refine_batch
from pipeline.training import (Progress, keep_best, make_optimizer, optimizer_step, seed_range, start_run,
                               validation_due)


@dataclass
class RefineTrainConfig:
    out_dir: str = "runs/refiner"
    train_seeds: list[int] = field(default_factory=lambda: list(range(100, 116)))
    val_seeds: list[int] = field(default_factory=lambda: [8001])
    cache_dir: str = "runs/cache"
    steps: int = 1500
    batch: int = 4
    lr: float = 2e-3
    weight_decay: float = 5e-4
    clip: float = 2.0
    width: int = 8
    seed: int = 0
    threads: int = 1
    val_every: int = 100
    max_minutes: float | None = None


def refine_cache_path(cache_dir: Path, seed: int) -> Path:
    return Path(cache_dir) / f"ref-phantom-{seed}-acq.npz"


def load_refine(cache_dir: Path, seeds) -> tuple[np.ndarray, np.ndarray]:
    parts = [np.load(refine_cache_path(cache_dir, s)) for s in seeds]
    return np.concatenate([p["ct"] for p in parts]), np.concatenate([p["occ"] for p in parts])


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1e-5) / ((p * p).sum() + (target * target).sum() + 1e-5)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


def train(cfg: RefineTrainConfig, log=None) -> Path:
    out, say = start_run(cfg, log, EVALUATION_SEEDS, "evaluation seeds (9001-9010) are not for training")
    cts, occs = load_refine(Path(cfg.cache_dir), cfg.train_seeds)
    vcts, voccs = load_refine(Path(cfg.cache_dir), cfg.val_seeds)
    say(f"{len(cts)} training crops, {len(vcts)} validation crops")
    vx, vt = refine_batch(vcts, voccs, np.random.default_rng(123), 16)
    model = ShallowRefiner(in_channels=2, width=cfg.width)
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    step, best = 0, math.inf
    progress = Progress(say, cfg.steps, every=20, digits=4, max_minutes=cfg.max_minutes)
    while step < cfg.steps:
        x, t = refine_batch(cts, occs, rng, cfg.batch)
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(t))
        optimizer_step(model, opt, loss, cfg.clip)
        step += 1
        progress.update(step, loss)
        timed_out = progress.timed_out()
        if validation_due(step, cfg.val_every, cfg.steps, timed_out):
            model.eval()
            with torch.no_grad():
                lg = model(torch.from_numpy(vx))
                vl = float(loss_fn(lg, torch.from_numpy(vt)))
                p = torch.sigmoid(lg).numpy() > 0.5
                g = vt > 0.5
                prior = vx[:, 1:2] > 0.5
                d = 2 * (p & g).sum() / (p.sum() + g.sum())
                d0 = 2 * (prior & g).sum() / (prior.sum() + g.sum())
            model.train()
            sched.step(vl)
            say(f"val step {step}: loss {vl:.4f} patch dice {d:.4f} (prior {d0:.4f})")
            best = keep_best(vl, best, out / "best.pt", model, step,
                             {"loss": vl, "dice": float(d), "prior_dice": float(d0)}, cfg)
        if timed_out:
            break
    return out / "best.pt"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--train-seeds", default="100-115")
    ap.add_argument("--val-seeds", default="8001")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--out-dir", default="runs/refiner")
    a = ap.parse_args()
    train(RefineTrainConfig(out_dir=a.out_dir, train_seeds=seed_range(a.train_seeds), val_seeds=seed_range(a.val_seeds),
                            steps=a.steps, max_minutes=a.max_minutes))


if __name__ == "__main__":
    main()
