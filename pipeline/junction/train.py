"""Training of the junction classifier (``spine-node train junction``).

Training volumes: synthesised from the split's train-side masks (synthesis seed
``synth_seed``), phantoms of training seeds and the train side's real CTs (each of their query
points counted ``real_repeat`` times); validation volumes: synthesised from the same
masks with a seed of their own (``val_synth_seed``), so no real validation subject is seen.
Every step draws a batch of query points: ``positive_fraction`` last mobile vertebrae above a
sacrum in view, ``hard_fraction`` near misses (the vertebra above, S1 itself, a last vertebra
whose sacrum is not in view, the point a step below the last one), the rest any other vertebra;
each crop is jittered, rescaled, turned (up to :data:`MAX_TILT_DEG` sagittally, half that
coronally), cut by a narrower field of view (:data:`FOV_CUT`: air beyond a plane in front of,
behind or beside the spine, as the tight crops of VerSe-style series are), mirrored left-right
and given another HU gain and offset. The
checkpoint with the lowest validation loss is kept, and its decision threshold is chosen on the
validation volumes (:func:`choose_threshold`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.junction.crops import AIR_HU, CROP, crop, normalise
from pipeline.junction.infer import JunctionState, decide, scores, step_below
from pipeline.junction.net import build_junction
from pipeline.junction.train_config import JunctionTrainConfig
from pipeline.junction.volumes import JunctionVolume, Query, cached_volumes, queries, real_volumes


def _seeds(spec: str) -> list[int]:
    from pipeline.evaluate import parse_seeds
    from pipeline.seeds import refuse_evaluation_seeds

    seeds = parse_seeds(spec)
    refuse_evaluation_seeds(seeds)
    return seeds


#: Largest sagittal turn of a training crop (degrees); coronal turns reach half of it.
MAX_TILT_DEG = 15.0


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random turn of the ``[z, y, x]`` sampling grid: about x (sagittal), then about y."""
    a, b = np.radians(rng.uniform(-1, 1, 2) * np.array([MAX_TILT_DEG, MAX_TILT_DEG / 2]))
    about_x = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_y = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
    return about_y @ about_x


#: Chance of a narrower field of view, and the range of its edge's distance from the query
#: point (mm) in front of, behind or beside it.
FOV_CUT = 0.4
FOV_CUT_MM = (12.0, 45.0)


def _fov_cut(c: np.ndarray, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """``c`` with air beyond a random plane ``FOV_CUT_MM`` from its centre line along y or x."""
    axis = int(rng.integers(1, 3))
    edge = int(round((CROP - 1) / 2.0 + rng.choice([-1, 1]) * rng.uniform(*FOV_CUT_MM)
                     / spacing_mm))
    air = normalise(np.float32(AIR_HU))
    index: list = [slice(None)] * 3
    index[axis] = slice(max(edge, 0), None) if edge > (CROP - 1) / 2.0 else slice(0, max(edge, 0))
    c[tuple(index)] = air
    return c


def _augmented(vol: JunctionVolume, q: Query, rng: np.random.Generator) -> np.ndarray:
    point = q.point + rng.uniform(-1.5, 1.5, 3)
    c = crop(vol.hu, point, vol.spacing_mm, scale=float(rng.uniform(0.9, 1.1)),
             rotation=_rotation(rng))
    if rng.random() < FOV_CUT:
        c = _fov_cut(c, vol.spacing_mm, rng)
    c = c * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.uniform(-0.15, 0.15))
    c = c + np.float32(rng.uniform(0.0, 0.1)) * rng.standard_normal(c.shape).astype(np.float32)
    return c[:, :, ::-1].copy() if rng.random() < 0.5 else c


def _pools(volumes: list[JunctionVolume], repeat: list[int]) -> dict[str, list[tuple[int, Query]]]:
    pools: dict[str, list[tuple[int, Query]]] = {"positive": [], "hard": [], "other": []}
    for i, (v, n) in enumerate(zip(volumes, repeat)):
        for q in queries(v):
            key = "positive" if q.target else ("hard" if q.hard else "other")
            pools[key] += [(i, q)] * n
    return pools


def _batch(volumes, pools, cfg: JunctionTrainConfig, rng: np.random.Generator):
    xs, ys = [], []
    for _ in range(cfg.batch):
        r = rng.random()
        key = ("positive" if r < cfg.positive_fraction else
               "hard" if r < cfg.positive_fraction + cfg.hard_fraction else "other")
        if not pools[key]:
            key = "other"
        i, q = pools[key][int(rng.integers(len(pools[key])))]
        xs.append(_augmented(volumes[i], q, rng))
        ys.append(q.target)
    x = torch.from_numpy(np.stack(xs)[:, None])
    return x, torch.tensor(ys, dtype=torch.float32)


def validation_set(volumes: list[JunctionVolume]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query of ``volumes``, unaugmented."""
    xs, ys = [], []
    for v in volumes:
        for q in queries(v):
            xs.append(crop(v.hu, q.point, v.spacing_mm))
            ys.append(q.target)
    return (torch.from_numpy(np.stack(xs)[:, None]) if xs else torch.zeros(0, 1, CROP, CROP, CROP),
            torch.tensor(ys, dtype=torch.float32))


@torch.no_grad()
def _val_loss(model, x, y, device) -> float:
    model.eval()
    logits = torch.cat([model(x[i:i + 64].to(device)).cpu() for i in range(0, len(x), 64)])
    model.train()
    return float(F.binary_cross_entropy_with_logits(logits, y))


def train(cfg: JunctionTrainConfig, log=print) -> Path:
    """Train; returns ``out/best.pt`` (with its threshold chosen on the validation volumes)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pack = Path(cfg.data)
    sources = ([(f"synth-{cfg.synth_seed}", k) for k in range(cfg.synth_cases)]
               + [("phantom", s) for s in _seeds(cfg.phantom_seeds)])
    if cfg.val_synth_seed == cfg.synth_seed:
        raise ValueError("--val-synth-seed must differ from --synth-seed")
    volumes = cached_volumes(Path(cfg.cache), sources, pack, log, cfg.myelography)
    repeat = [1] * len(volumes)
    if cfg.real_subjects:
        from pipeline.realdata.split import load_split

        subjects = (list(load_split().train) if cfg.real_subjects == "train"
                    else cfg.real_subjects.split(","))
        real = real_volumes(pack, subjects)
        log(f"{len(real)} real CTs: " + ", ".join(v.name for v in real))
        volumes += real
        repeat += [cfg.real_repeat] * len(real)
    val_volumes = cached_volumes(Path(cfg.cache), [(f"synth-{cfg.val_synth_seed}", k)
                                                   for k in range(cfg.val_synth_cases)], pack, log,
                                 cfg.myelography)
    pools = _pools(volumes, repeat)
    log(f"{len(volumes)} training volumes: {len(pools['positive'])} junctions, "
        f"{len(pools['hard'])} near misses, {len(pools['other'])} other vertebrae")
    vx, vy = validation_set(val_volumes)
    device = torch.device(cfg.device)
    model = build_junction(cfg.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr / 50)
    best, history, t0 = float("inf"), [], time.time()
    for step in range(1, cfg.steps + 1):
        x, y = _batch(volumes, pools, cfg, rng)
        loss = F.binary_cross_entropy_with_logits(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.val_every == 0 or step == cfg.steps:
            val = _val_loss(model, vx, vy, device)
            history.append({"step": step, "train_loss": loss.item(), "val_loss": val})
            log(f"step {step}/{cfg.steps} loss {loss.item():.4f} val {val:.4f} "
                f"({time.time() - t0:.0f} s)")
            if val < best:
                best = val
                torch.save({"config": {"width": cfg.width}, "state_dict": model.state_dict(),
                            "step": step, "val_loss": val, "train": asdict(cfg)}, out / "best.pt")
    ck = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    ck["threshold"], ck["threshold_report"] = choose_threshold(model, val_volumes)
    ck["history"] = history
    torch.save(ck, out / "best.pt")
    (out / "report.json").write_text(json.dumps({k: ck[k] for k in ("step", "val_loss", "threshold",
                                                                    "threshold_report", "history")},
                                                indent=1))
    log(f"best step {ck['step']} val {ck['val_loss']:.4f} threshold {ck['threshold']:.2f}")
    return out / "best.pt"


def install(best: Path, weights_dir: Path | None = None) -> Path:
    """Install a ``best.pt`` as the shipped ``junction`` weights (registry + manifest; into
    ``weights_dir`` instead of the package's where given)."""
    from pipeline.junction.crops import BELOW_MM
    from pipeline.junction.grid import SPACING_MM
    from pipeline.registry import WEIGHTS_DIR, install_weights, weights_payload

    ck = torch.load(best, map_location="cpu", weights_only=False)
    model = build_junction(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    meta = {"spacing_mm": SPACING_MM, "crop": CROP, "below_mm": BELOW_MM,
            "threshold": float(ck["threshold"]), "threshold_report": ck["threshold_report"],
            "step": ck["step"], "val_loss": ck["val_loss"], "train": ck["train"]}
    tmp = Path(best).with_name("junction.pt")
    torch.save(weights_payload(model, "pipeline.junction.net:build_junction", meta), tmp)
    return install_weights("junction", tmp, weights_dir or WEIGHTS_DIR, trained_steps=ck["step"])


def _trials(vol: JunctionVolume) -> list[tuple[np.ndarray, np.ndarray, JunctionState]]:
    """The situations a volume offers at its true centroids: the whole chain (the truth is
    "last" where S1 is in view) and the chain without its lowest vertebra ("below")."""
    cents = [vol.centers[k] for k in vol.chain()]
    s1 = not np.isnan(vol.s1[0])
    out = []
    if len(cents) >= 2:
        out.append((cents[-1], step_below(cents, 0.0), "last" if s1 else "none"))
    if len(cents) >= 3:
        out.append((cents[-2], step_below(cents[:-1], 0.0), "below" if s1 else "none"))
    return out


def choose_threshold(model: torch.nn.Module, volumes: Sequence[JunctionVolume],
                     grid: Sequence[float] = tuple(np.round(np.arange(0.5, 0.996, 0.01), 2))
                     ) -> tuple[float, dict]:
    """The lowest threshold of ``grid`` at which no decision on ``volumes`` is wrong (else the
    one with fewest wrong, then most right), with the counts at it."""
    rows = []
    for vol in volumes:
        for lowest, step, truth in _trials(vol):
            p = scores(model, vol.hu, [lowest, lowest + step], vol.spacing_mm)
            rows.append((float(p[0]), float(p[1]), truth))
    best, best_key, report = grid[-1], None, {}
    for t in grid:
        said = [(decide(a, b, t), truth) for a, b, truth in rows]
        wrong = sum(s != "none" and s != truth for s, truth in said)
        right = sum(s != "none" and s == truth for s, truth in said)
        key = (wrong, -right, t)
        if best_key is None or key < best_key:
            best, best_key = float(t), key
            report = {"trials": len(rows), "fixable": sum(tr != "none" for _, _, tr in rows),
                      "right": right, "wrong": wrong,
                      "abstained": sum(s == "none" for s, _ in said)}
    return best, report
