"""Gradual unfreezing (fastai's fine_tune, Lightning's BackboneFinetuning): the run starts from its
strategy (the head alone, or a partial set), and from given epochs on more of the network trains.

`--unfreeze-schedule 2:1 4:3 6:all`: epochs 1-2 as the strategy says, from epoch 3 the last stage
as well, from epoch 5 the last three, from epoch 7 everything. Stages are timm's coarse groups
(as `--unfreeze-last`); BatchNorm layers of parts still frozen stay in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UserError
from .trainable import TrainableSet, apply_strategy

ALL = "all"


@dataclass(frozen=True)
class UnfreezeStep:
    epoch: int  # epochs completed before this step applies
    stages: int | str  # the last N stages, or "all"


def parse_unfreeze_schedule(entries: list[str]) -> list[UnfreezeStep]:
    steps = []
    for entry in entries:
        epoch, sep, stages = str(entry).partition(":")
        try:
            if not sep:
                raise ValueError
            step = UnfreezeStep(int(epoch), ALL if stages.strip() == ALL else int(stages))
        except ValueError:
            raise UserError(f"--unfreeze-schedule {entry!r} is not valid: write EPOCH:N (the last N stages train "
                            f"after EPOCH epochs) or EPOCH:all") from None
        if step.epoch < 1 or (step.stages != ALL and step.stages < 1):
            raise UserError(f"--unfreeze-schedule {entry!r} is not valid: EPOCH and N must be >= 1")
        steps.append(step)
    epochs = [s.epoch for s in steps]
    if epochs != sorted(set(epochs)):
        raise UserError(f"--unfreeze-schedule {' '.join(entries)}: the epochs must increase")
    sizes = [float("inf") if s.stages == ALL else s.stages for s in steps]
    if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
        raise UserError(f"--unfreeze-schedule {' '.join(entries)}: each step must unfreeze more than the one before")
    return steps


class GradualUnfreezing:
    """The trainable set of each epoch, from the run's strategy and its unfreeze schedule."""

    def __init__(self, config):
        self.config = config
        self.steps = parse_unfreeze_schedule(config.unfreeze_schedule)

    def step_at(self, epoch: int) -> UnfreezeStep | None:
        """The step in force during (0-based) `epoch`."""
        current = None
        for step in self.steps:
            if epoch >= step.epoch:
                current = step
        return current

    def apply(self, model: nn.Module, epoch: int) -> TrainableSet:
        step = self.step_at(epoch)
        config = self.config
        if step is None:
            return apply_strategy(model, config.strategy, config.trainable, config.unfreeze_last)
        if step.stages == ALL:
            return apply_strategy(model, "fine-tune")
        return apply_strategy(model, "partial", config.trainable, max(step.stages, config.unfreeze_last or 0))

    def final_names(self, model: nn.Module) -> list[str]:
        """Every parameter that trains at some epoch (the optimizer holds them all from the start)."""
        last = self.apply(model, self.steps[-1].epoch) if self.steps else None
        names = last.trainable if last is not None else []
        self.apply(model, 0)
        return names

    def describe(self, step: UnfreezeStep | None) -> str:
        if step is None:
            return f"the {self.config.strategy} set"
        if step.stages == ALL:
            return "the whole network"
        return "the last stage and the head" if step.stages == 1 else f"the last {step.stages} stages and the head"
