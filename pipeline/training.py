"""Shared training loop parts of the pipeline's trainers (paper section 3.2 settings).

Used by :mod:`pipeline.segmentation.train`, :mod:`pipeline.segmentation.train_refiner` and
:mod:`pipeline.keypoints.train`; written so that :mod:`pipeline.localization.train` can adopt it
(the optimiser names, momentum, plateau factor/patience and the logger are parameters).

- :func:`start_run`: run directory, logger (``log.txt`` + stdout), evaluation-seed guard,
  torch threads + seed, ``config.json``;
- :func:`make_optimizer`: AdamW / Adam / SGD with weight decay and a ``ReduceLROnPlateau``
  scheduler (the paper's plateau scheduler);
- :func:`optimizer_step`: zero-grad, backward, gradient-norm clipping (paper: 2.0), step;
- :class:`Progress`: running loss, s/step, ETA and the wall-clock limit;
- :func:`cosine_lr`, :func:`anneal`, :class:`LrSchedule`: the learning-rate policy of a run, the
  plateau scheduler or cosine annealing over what is left of the run (its steps or its
  wall-clock limit, whichever ends it first);
- :func:`save_best`, :func:`save_last`, :func:`resume`: the ``best.pt`` and ``last.ckpt``
  formats (unchanged: ``{config, state_dict, step, val, train}`` and
  ``{model, opt, sched, step, best, rng}``); checkpoints load onto the CPU first, so that a run
  trained on a GPU resumes or installs on a machine without one;
- :func:`init_from`: fine-tuning from another run's ``best.pt``;
- :func:`train_device`, :func:`autocast`, :func:`train_step`: the device of a run (``cpu`` |
  ``cuda`` | ``auto``), bf16 autocasting of the forward pass on a GPU, one step on a numpy batch;
- :class:`Prefetch`: training batches assembled in a background thread while the GPU computes;
- :func:`generate_parallel`: a trainer's missing phantom caches written by a process pool;
- :func:`check_synth_validation`: the guards of a validation group synthesised from real masks.
"""
from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.seeds import refuse_evaluation_seeds

Logger = Callable[[str], None]


def log_line(out_dir: Path, msg: str) -> None:
    """Print ``HH:MM:SS msg`` and append it to ``out_dir/log.txt``."""
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(out_dir / "log.txt", "a") as fh:
        fh.write(line + "\n")


def start_run(cfg: Any, log: Logger | None, evaluation_seeds: Iterable[int],
              seeds_error: str | None = None) -> tuple[Path, Logger]:
    """Create ``cfg.out_dir``, refuse evaluation seeds, set threads and seed, write ``config.json``.

    ``seeds_error``: the message of the ``ValueError`` (default names the offending seeds).
    Returns the run directory and the logger (``log`` or :func:`log_line` into the run directory).
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda m: log_line(out, m))
    bad = set(cfg.train_seeds + cfg.val_seeds) & set(evaluation_seeds)
    if bad:
        if seeds_error:
            raise ValueError(seeds_error)
        refuse_evaluation_seeds(bad)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out, say


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, optimizer: str = "adamw",
                   momentum: float = 0.99, factor: float = 0.5, patience: int = 3):
    """``optimizer``: ``adamw`` | ``adam`` | ``sgd`` (with ``momentum``); plus the plateau scheduler."""
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=factor, patience=patience)
    return opt, sched


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> None:
    """Zero the gradients, back-propagate ``loss``, clip the gradient norm at ``clip``, step."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


class Progress:
    """Running loss, ``step i/n loss .. s/step ETA .. min`` every ``every`` steps, time limit."""

    def __init__(self, say: Logger, steps: int, start_step: int = 0, every: int = 20, digits: int = 4,
                 max_minutes: float | None = None):
        self.say, self.steps, self.every, self.digits = say, steps, every, digits
        self.max_minutes = max_minutes
        self.t0, self.s0, self.running = time.time(), start_step, []

    def update(self, step: int, loss: torch.Tensor) -> None:
        """Record the loss of ``step`` (already counted) and log every ``every`` steps."""
        self.running.append(float(loss.detach()))
        if step % self.every == 0:
            rate = (time.time() - self.t0) / (step - self.s0)
            self.say(f"step {step}/{self.steps} loss {np.mean(self.running[-self.every:]):.{self.digits}f} "
                     f"{rate:.2f} s/step ETA {(self.steps - step) * rate / 60:.1f} min")

    def timed_out(self) -> bool:
        return self.max_minutes is not None and (time.time() - self.t0) / 60 > self.max_minutes

    def fraction(self, step: int) -> float:
        """How much of this run (since its start or resume) is done: the larger of the steps'
        and the time limit's fractions, so that an annealing ends with the run whichever stops it."""
        f = (step - self.s0) / max(self.steps - self.s0, 1)
        if self.max_minutes:
            f = max(f, (time.time() - self.t0) / 60 / self.max_minutes)
        return f


def cosine_lr(lr: float, progress: float, floor: float = 0.01) -> float:
    """Cosine annealing from ``lr`` (progress 0) to ``floor * lr`` (progress 1)."""
    p = min(max(progress, 0.0), 1.0)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def anneal(opt: torch.optim.Optimizer, lr: float, progress: float) -> None:
    """Set every parameter group's learning rate to :func:`cosine_lr` at ``progress``."""
    for group in opt.param_groups:
        group["lr"] = cosine_lr(lr, progress)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (a resumed run that restarts its annealing)."""
    for group in opt.param_groups:
        group["lr"] = lr


class LrSchedule:
    """A run's learning-rate policy: ``plateau`` (the paper's ``ReduceLROnPlateau``, stepped on
    the validation loss) or ``cosine`` (from ``lr`` to ``lr/100`` over the rest of the run)."""

    KINDS = ("plateau", "cosine")

    def __init__(self, kind: str, lr: float, opt: torch.optim.Optimizer, plateau) -> None:
        self.check(kind)
        self.kind, self.lr, self.opt, self.plateau = kind, lr, opt, plateau

    @classmethod
    def check(cls, kind: str) -> None:
        """Refuse an unknown schedule (before a run spends minutes loading its data)."""
        if kind not in cls.KINDS:
            raise ValueError(f"unknown schedule {kind!r} (plateau | cosine)")

    def resumed(self, step: int, reset_lr: bool, say: Logger) -> None:
        """After :func:`resume`: restart at ``lr`` when asked (a new annealing of a resumed run)."""
        if step and reset_lr:
            set_lr(self.opt, self.lr)
            say(f"learning rate reset to {self.lr:.2e}")

    def before_step(self, progress: Progress, step: int) -> None:
        if self.kind == "cosine":
            anneal(self.opt, self.lr, progress.fraction(step))

    def validated(self, loss: float) -> None:
        if self.kind == "plateau":
            self.plateau.step(loss)


def save_best(path: Path, model: torch.nn.Module, step: int, val: dict, cfg: Any) -> None:
    """The ``best.pt`` format: ``{config, state_dict, step, val, train}``."""
    torch.save({"config": model.config, "state_dict": model.state_dict(), "step": step,
                "val": val, "train": asdict(cfg)}, path)


def keep_best(score: float, best: float, path: Path, model: torch.nn.Module, step: int, val: dict,
              cfg: Any) -> float:
    """Save ``best.pt`` when ``score`` (lower is better) beats ``best``; returns the new best."""
    if score < best:
        save_best(path, model, step, val, cfg)
        return score
    return best


def save_last(path: Path, model: torch.nn.Module, opt, sched, step: int, best: float,
              rng: np.random.Generator) -> None:
    """The resumable ``last.ckpt`` format: ``{model, opt, sched, step, best, rng}``."""
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "step": step, "best": best, "rng": rng.bit_generator.state}, path)


def resume(path: Path, model: torch.nn.Module, opt, sched, rng: np.random.Generator,
           say: Logger) -> tuple[int, float]:
    """Load ``path`` (a :func:`save_last` checkpoint) if it exists; returns ``(step, best)``."""
    if not path.exists():
        return 0, math.inf
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rng.bit_generator.state = state["rng"]
    say(f"resumed at step {state['step']}")
    return state["step"], state["best"]


def init_from(model: torch.nn.Module, path: str | Path, say: Logger) -> None:
    """Start ``model`` from the weights of another run's ``best.pt`` (fine-tuning); refuses a
    file of another network (``config``)."""
    init = torch.load(path, map_location="cpu", weights_only=False)
    if init["config"] != model.config:
        raise ValueError(f"--init-from {path}: network {init['config']} is not {model.config}")
    model.load_state_dict(init["state_dict"])
    say(f"initialised from {path} (step {init.get('step')})")


def train_device(name: str = "cpu") -> torch.device:
    """The device of a training run: ``cpu``, ``cuda`` (refused without a GPU) or ``auto``."""
    from pipeline.registry import resolve_device

    return resolve_device(name)


def autocast(device: torch.device):
    """bf16 autocasting of the forward pass on a GPU (losses are computed in float32 by the
    callers); on the CPU, nothing (float32 throughout, as before)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Prefetch:
    """Batches from ``make()`` assembled ``depth`` ahead in one background thread (numpy releases
    the GIL in the crop arithmetic), so that a GPU does not wait for the CPU between steps.

    One producer keeps the batch order of the sequential loop; the sampling generator runs ahead of
    the consumed steps by at most ``depth`` batches, so a resumed run draws those again.
    """

    def __init__(self, make: Callable[[], Any], depth: int = 4) -> None:
        self._make, self._q = make, queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="batch-prefetch")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self._make(), None)
            except BaseException as exc:  # noqa: BLE001 - any error goes to the training loop, which raises it
                item = (None, exc)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch, exc = self._q.get()
        if exc is not None:
            raise exc
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: np.ndarray | torch.Tensor,
               target: np.ndarray | torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               device: torch.device, clip: float) -> torch.Tensor:
    """One step on a batch (numpy arrays or CPU tensors): the forward pass under :func:`autocast`,
    ``loss_fn`` on the float32 output, then :func:`optimizer_step`; returns the loss."""
    with autocast(device):
        logits = model(torch.as_tensor(x).to(device, non_blocking=True))
    loss = loss_fn(logits.float(), torch.as_tensor(target).to(device, non_blocking=True))
    optimizer_step(model, opt, loss, clip)
    return loss


def batches(make: Callable[[], Any], device: torch.device) -> Iterator[Any]:
    """``make()`` again and again: in the loop's own thread on the CPU (exactly reproducible on
    resume), through :class:`Prefetch` on a GPU."""
    if device.type != "cuda":
        while True:
            yield make()
    pf = Prefetch(make)
    try:
        yield from pf
    finally:
        pf.close()


def generate_parallel(missing: list[int], work: Callable[[int], Any], workers: int, say: Logger) -> list[Any]:
    """``[work(seed) for seed in missing]`` (each writes one cache file), on a pool of ``workers``
    processes when ``workers > 1`` (``spawn``: no torch or CUDA state is inherited; ``work`` must
    be importable, e.g. a ``functools.partial`` of a module-level function), one torch thread each."""
    if not missing:
        return []
    out: list[Any] = []
    if workers > 1 and len(missing) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        t0 = time.time()
        try:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                        initializer=torch.set_num_threads, initargs=(1,)) as pool:
                for n, result in enumerate(pool.map(work, missing), 1):
                    out.append(result)
                    if n % 10 == 0 or n == len(missing):
                        say(f"generated {n}/{len(missing)} phantoms ({time.time() - t0:.0f} s, {workers} processes)")
        except cf.process.BrokenProcessPool as exc:
            # e.g. a main script read from stdin, which spawned processes cannot import again
            say(f"the process pool broke ({exc}); the remaining {len(missing) - len(out)} phantoms "
                "are generated here, one after the other")
    for seed in missing[len(out):]:
        out.append(work(seed))
        say(f"cached phantom {seed}")
    return out


def validation_due(step: int, every: int, steps: int, timed_out: bool) -> bool:
    """Validate every ``every`` steps, at the last step and when stopping on the time limit."""
    return step % every == 0 or step == steps or timed_out


def check_synth_validation(synth_real_dir: str | None, seed: int, val_seed: int, what: str) -> None:
    """Refuse a synthesised validation group without masks to synthesise from, or with the
    training ``what``'s own seed (it would validate on training data)."""
    if not synth_real_dir:
        raise ValueError("val_synth_cases needs synth_real_dir (--synth-from)")
    if val_seed == seed:
        raise ValueError(f"val_synth_seed {val_seed} is the training {what}' seed; choose another")
