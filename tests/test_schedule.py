"""Learning-rate schedules, in epochs, stepped per optimizer step."""

import math

import pytest
import torch

from warmstart import RunConfig
from warmstart.errors import UserError
from warmstart.train.schedule import lr_factor, make_scheduler


def test_piecewise_follows_the_demo_semantics():
    # --piecewise-boundaries 5 8 --piecewise-lr-decay 1 0.1 0.01
    factors = [lr_factor(e, 10, "piecewise", 0, [5, 8], [1, 0.1, 0.01]) for e in (0, 4.99, 5, 7.5, 8, 9.9)]
    assert factors == [1, 1, 0.1, 0.1, 0.01, 0.01]


def test_piecewise_scheduler_steps_per_batch():
    config = RunConfig(data="x", epochs=4, schedule="piecewise", piecewise_boundaries=[2],
                       piecewise_lr_decay=[1.0, 0.1], lr=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = make_scheduler(opt, config, steps_per_epoch=3)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5] * 6 + [0.05] * 6)


def test_cosine_with_warmup():
    assert lr_factor(0.5, 10, "cosine", warmup_epochs=1) == pytest.approx(0.5, abs=1e-6)
    assert lr_factor(1, 10, "cosine", warmup_epochs=1) == pytest.approx(1.0)
    assert lr_factor(5.5, 10, "cosine", warmup_epochs=1) == pytest.approx(0.5)
    assert lr_factor(10, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(2.5, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_piecewise_needs_one_factor_per_piece():
    with pytest.raises(UserError, match="one factor per piece"):
        RunConfig(data="x", schedule="piecewise", piecewise_boundaries=[2, 4], piecewise_lr_decay=[1, 0.1]).validated()
