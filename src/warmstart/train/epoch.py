"""The one epoch loop, shared by every training path (images, cached features, cached boundary
activations): each path brings its batches and its optimizer step; what happens after a step
(the step log, a checkpoint, a stop, EMA) are hooks. Loss and correct counts accumulate on the
device: nothing waits for the accelerator inside the loop except every LOG_EVERY steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

LOG_EVERY = 25  # optimizer steps between step-log entries (each one waits for the device)


@dataclass
class Totals:
    """An epoch's loss sum, correct count and image count so far."""

    loss: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, loss: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss = self.loss + loss.detach().float() * len(labels)
        self.correct = self.correct + (logits.argmax(1) == labels).sum()
        self.count += len(labels)

    def values(self) -> tuple[float, int, int]:
        """(loss sum, correct, count) as plain numbers (this waits for the device)."""
        return float(self.loss), int(self.correct), self.count


@dataclass
class Progress:
    """Where training is: the epoch, batches done in it, optimizer steps done in the run, and the
    epoch's running totals."""

    epoch: int
    batch: int = 0
    step: int = 0
    totals: Totals = field(default_factory=Totals)
    last_loss: torch.Tensor | None = None


# a training step: (inputs, targets) -> (logits, loss), or None for a batch with no image
Step = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


def train_one_epoch(batches: Iterable, step: Step, progress: Progress,
                    hooks: Iterable[Callable[[Progress], None]] = ()) -> Totals:
    """One pass over `batches` of (inputs, targets, labels): targets may be soft (mixup), labels
    are the hard classes the top-1 is counted against. After each step every hook sees `progress`."""
    hooks = list(hooks)
    for inputs, targets, labels in batches:
        out = step(inputs, targets) if len(labels) else step(None, None)
        if out is not None:
            logits, loss = out
            progress.totals.add(logits, loss, labels)
            progress.last_loss = loss
        progress.step += 1
        progress.batch += 1
        for hook in hooks:
            hook(progress)
    return progress.totals


def every(steps: int, hook: Callable[[Progress], None]) -> Callable[[Progress], None]:
    """`hook` on every `steps`-th optimizer step only."""
    return lambda progress: hook(progress) if progress.step % steps == 0 else None


def step_logger(log, optimizer, current_lr) -> tuple[Callable[[Progress], None], Callable[[Progress], None]]:
    """The step log's hook (every LOG_EVERY steps) and what to call after the epoch (its last step,
    unless just logged): each entry waits for the device, so not every step has one."""
    def write(progress: Progress) -> None:
        if progress.last_loss is not None:
            log.step(progress.step, float(progress.last_loss), current_lr(optimizer))

    return every(LOG_EVERY, write), lambda progress: write(progress) if progress.step % LOG_EVERY else None
