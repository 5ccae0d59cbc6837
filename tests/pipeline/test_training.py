"""The shared training helpers: cosine annealing over what is left of a (resumed) run."""
from __future__ import annotations

import pytest
import torch

from pipeline.training import Progress, anneal, cosine_lr, set_lr


def test_cosine_lr_runs_from_lr_to_a_hundredth():
    assert cosine_lr(1e-3, 0.0) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 0.5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert cosine_lr(1e-3, 1.0) == pytest.approx(1e-5)
    assert cosine_lr(1e-3, 2.0) == pytest.approx(1e-5)     # past the end: stays at the floor
    lrs = [cosine_lr(1.0, p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_progress_fraction_counts_from_the_resumed_step_and_the_time_limit():
    p = Progress(lambda m: None, steps=300, start_step=100)
    assert p.fraction(100) == 0.0
    assert p.fraction(200) == pytest.approx(0.5)
    assert p.fraction(300) == pytest.approx(1.0)
    timed = Progress(lambda m: None, steps=10_000, start_step=0, max_minutes=1.0)
    timed.t0 -= 45.0                                       # 45 s of a one-minute budget are gone
    assert timed.fraction(10) == pytest.approx(0.75, abs=0.01)


def test_anneal_and_set_lr_change_every_parameter_group():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.Adam([{"params": a.parameters()}, {"params": b.parameters(), "lr": 5.0}], lr=1.0)
    anneal(opt, 2e-3, 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-5, 2e-5])
    set_lr(opt, 7e-4)
    assert [g["lr"] for g in opt.param_groups] == [7e-4, 7e-4]


def test_lr_schedule_cosine_anneals_and_plateau_steps_on_the_validation_loss():
    from pipeline.training import LrSchedule

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    with pytest.raises(ValueError, match="unknown schedule"):
        LrSchedule.check("step")
    cosine = LrSchedule("cosine", 1e-3, opt, plateau)
    cosine.resumed(100, True, lambda m: None)
    assert opt.param_groups[0]["lr"] == 1e-3
    cosine.before_step(Progress(lambda m: None, steps=200, start_step=100), 150)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(1e-3, 0.5))
    cosine.validated(1.0)                                       # the plateau scheduler is not stepped
    cosine.validated(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(1e-3, 0.5))
    set_lr(opt, 1e-3)
    flat = LrSchedule("plateau", 1e-3, opt, plateau)
    flat.before_step(Progress(lambda m: None, steps=200), 150)  # no annealing
    assert opt.param_groups[0]["lr"] == 1e-3
    flat.validated(1.0)                                         # no improvement: halved
    flat.validated(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
