"""Choosing what trains: feature extractor, partial (patterns or last N stages), or fine-tune.

Frozen BatchNorm layers stay in eval mode while the model trains, so their running
statistics are used, never updated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from timm.models import group_parameters
from torch import nn

from ..errors import UserError
from .weights import classifier_names, matches


@dataclass
class TrainableSet:
    strategy: str
    trainable: list[str]
    frozen_norms: list[nn.Module] = field(default_factory=list, repr=False)

    def count(self, model: nn.Module) -> int:
        names = set(self.trainable)
        return sum(p.numel() for n, p in model.named_parameters() if n in names)


def last_stages(model: nn.Module, count: int) -> list[str]:
    """Parameter names of the last `count` stages, as timm groups the model (coarse groups)."""
    if not hasattr(model, "group_matcher"):
        raise UserError(f"{type(model).__name__} has no stage structure in timm: use --trainable PATTERN instead")
    head = set(classifier_names(model))
    groups = [names for names in group_parameters(model, model.group_matcher(coarse=True)).values()]
    stages = [names for names in groups if not set(names) <= head]
    if count > len(stages):
        raise UserError(f"--unfreeze-last {count} is more than the model's {len(stages)} stages")
    return [n for names in stages[len(stages) - count:] for n in names]


def apply_strategy(
    model: nn.Module, strategy: str, patterns: list[str] | None = None, unfreeze_last: int | None = None
) -> TrainableSet:
    """Set requires_grad for the strategy; the new head always trains."""
    head = set(classifier_names(model))
    chosen = set(head)
    if strategy == "fine-tune":
        chosen = {n for n, _ in model.named_parameters()}
    elif strategy == "partial":
        if patterns:
            by_pattern = {n for n, _ in model.named_parameters() if matches(n, patterns)}
            if not by_pattern - head:
                raise UserError(
                    f"--trainable {' '.join(patterns)} matches no parameter outside the head: "
                    f"names look like {next(iter(n for n, _ in model.named_parameters()))}"
                )
            chosen |= by_pattern
        if unfreeze_last:
            chosen |= set(last_stages(model, unfreeze_last))
    elif strategy != "feature-extractor":
        raise UserError(f"unknown strategy {strategy!r}: use feature-extractor, partial or fine-tune")
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return with_frozen_norms(model, TrainableSet(strategy, trainable))


def with_frozen_norms(model: nn.Module, trainable: TrainableSet) -> TrainableSet:
    """The BatchNorm layers whose parameters are all frozen (kept in eval mode while training)."""
    norms = [] if trainable.strategy == "fine-tune" else [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]
    return TrainableSet(trainable.strategy, trainable.trainable, norms)


def set_train_mode(model: nn.Module, trainable: TrainableSet) -> None:
    """model.train(), except the frozen BatchNorm layers, which keep using their statistics."""
    model.train()
    for module in trainable.frozen_norms:
        module.eval()


def only_head_trains(model: nn.Module, trainable: TrainableSet) -> bool:
    return set(trainable.trainable) <= set(classifier_names(model))
