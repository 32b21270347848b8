"""Learning-rate schedules, stepped per optimizer step, defined in epochs.

`piecewise` follows the original demo: `--piecewise-boundaries 5 8 --piecewise-lr-decay 1 0.1 0.01`
trains epochs [0, 5) at lr, [5, 8) at lr x 0.1 and [8, end) at lr x 0.01.
"""

from __future__ import annotations

import bisect
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(
    epoch: float, total_epochs: float, schedule: str, warmup_epochs: float = 0.0,
    boundaries: list[float] | None = None, decays: list[float] | None = None,
) -> float:
    """The multiplier of the base learning rate at (fractional) `epoch`."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        warm = (epoch + 1e-8) / warmup_epochs
    else:
        warm = 1.0
    if schedule == "piecewise":
        factor = (decays or [1.0])[bisect.bisect_right(boundaries or [], epoch)]
    elif schedule == "cosine":
        span = max(total_epochs - warmup_epochs, 1e-8)
        progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    return warm * factor


def make_scheduler(optimizer: Optimizer, config, steps_per_epoch: int) -> LambdaLR:
    steps_per_epoch = max(steps_per_epoch, 1)

    def factor(step: int) -> float:
        return lr_factor(
            step / steps_per_epoch, config.epochs, config.schedule, config.warmup_epochs,
            config.piecewise_boundaries, config.piecewise_lr_decay,
        )

    return LambdaLR(optimizer, factor)
