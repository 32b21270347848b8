"""How a linear head is fitted (`HeadFit`: its own settings, narrowed from a run's config) and
what keeps it near its start. The pretrained start: the old classifier's rows for the classes it
knows (`PretrainedStart`). The pull: L2-SP for the head (Li et al., 2018), the penalty measures
each row's distance from where it started, not from zero, so rows that start from the pretrained
classifier are pulled back toward what ImageNet taught it, and rows that start from zero keep the
plain weight decay. The teacher: the pretrained classifier's softened predictions as part of the
probe's targets.

The pull is a Gaussian prior around the start: --head-prior A is A/2 x |W - start|^2 on the
loss summed over the training images, i.e. A/n on the mean loss of n images, so it weighs less
as there are more photos to learn from (measured: BENCHMARKS.md §10).

With --head-teacher S the logistic probe also learns from what the pretrained classifier would
say: each training photo of a class it knows is fitted to (1 - S) x its label + S x the classifier's
prediction among the known classes, softened by TEMPERATURE (Hinton et al., 2015). Measured on
photos no ImageNet-1k network trained on (BENCHMARKS.md §10, clean splits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.pretrained_classes import PretrainedStart

TEMPERATURE = 4.0  # Hinton's softening; 2 helped less on never-seen photos (BENCHMARKS.md §10)


@dataclass(frozen=True)
class HeadFit:
    """A head's own settings, as `SourceOptions.of(config)` narrows a config for the data: the
    learning rate, plain weight decay (rows with no pretrained start), the pull toward the
    pretrained start (--head-prior), the teacher's share of the targets (--head-teacher), and the
    logistic probe's L-BFGS steps (--epochs)."""

    lr: float = 1.0
    weight_decay: float = 1e-3
    pull: float = 30.0
    teacher: float = 0.0
    steps: int = 10
    teacher_temperature: float = TEMPERATURE  # the teacher's softening (a study may vary it)

    @classmethod
    def of(cls, config) -> "HeadFit":
        return cls(config.resolved_lr(), config.weight_decay, config.head_prior, config.head_teacher, config.epochs)

    @classmethod
    def linear_probe(cls, pull: float = 30.0) -> "HeadFit":
        """`--recipe linear-probe`'s head (its lr, decay and steps; labels alone, no teacher)."""
        from ..recipes import recipe_settings

        probe = recipe_settings("linear-probe")
        return cls(probe["lr"], probe["weight_decay"], pull, 0.0, probe["epochs"])


class HeadAnchor:
    """0.5 x sum over rows of strength_r x |W_r - start_r|^2 on the mean loss (biases are not
    penalised): strength pull / images for rows that start from the pretrained classifier,
    the plain weight decay for the others."""

    def __init__(self, head: torch.nn.Module, start: torch.Tensor, strengths: torch.Tensor):
        self.head = head
        self.start = start.to(head.weight.device, head.weight.dtype)
        shape = (-1,) + (1,) * (start.ndim - 1)
        self.strengths = strengths.to(head.weight.device, head.weight.dtype).reshape(shape)

    @classmethod
    def of(cls, head: torch.nn.Module, start: PretrainedStart | None, fit: HeadFit, images: int) -> "HeadAnchor":
        """The head's anchor for training on `images` images: its pretrained start's rows, or zero
        (then it is plain weight decay)."""
        if start is None:
            return cls(head, torch.zeros_like(head.weight), torch.full((head.weight.shape[0],), fit.weight_decay))
        strengths = torch.where(start.matched, torch.tensor(fit.pull / max(images, 1)), torch.tensor(fit.weight_decay))
        return cls(head, start.weight, strengths)

    def penalty(self) -> torch.Tensor:
        return 0.5 * (self.strengths * (self.head.weight - self.start).pow(2)).sum()


class AnchoredLoss(torch.nn.Module):
    """A loss plus the head's anchor penalty (the optimizer then applies no weight decay to the head)."""

    def __init__(self, criterion: torch.nn.Module, anchor: HeadAnchor):
        super().__init__()
        self.criterion, self.anchor = criterion, anchor

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits, targets) + self.anchor.penalty()


def regularised(criterion: torch.nn.Module, model: torch.nn.Module, start: PretrainedStart | None, fit: HeadFit,
                images: int) -> tuple[torch.nn.Module, bool]:
    """The head's regularisation, one rule for every optimizer: with a pretrained start the loss
    carries the anchor (each row pulled toward its start, or decayed toward zero) and the optimizer
    must not also decay the head; without one, the loss is as it is and the optimizer decays the
    head. Returns (the loss, whether the optimizer decays the head)."""
    if start is None:
        return criterion, True
    return AnchoredLoss(criterion, HeadAnchor.of(model.get_classifier(), start, fit, images)), False


def teacher_targets(features: torch.Tensor, labels: torch.Tensor, start: PretrainedStart, share: float,
                    temperature: float = TEMPERATURE) -> torch.Tensor:
    """Soft targets [N, classes] for a linear head on `features` [N, D]: (1 - share) x one-hot +
    share x the pretrained classifier's softened probabilities over the classes it knows, for photos
    of those classes; one-hot for the others (the classifier knows nothing about them)."""
    known = start.matched.to(features.device)
    weight = start.weight.to(features.device, features.dtype).reshape(len(known), -1)
    logits = features @ weight.T + (start.bias.to(features.device, features.dtype) if start.bias is not None else 0)
    soft = (logits / temperature).masked_fill(~known, float("-inf")).softmax(1)
    hard = F.one_hot(labels, len(known)).to(features.dtype)
    return torch.where(known[labels][:, None], (1 - share) * hard + share * soft, hard)
