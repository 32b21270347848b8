"""L2-SP for the head (Li et al., 2018): the penalty measures each row's distance from where it
started, not from zero, so rows that start from the pretrained classifier are pulled back
toward what ImageNet taught it, and rows that start from zero keep the plain weight decay.

The pull is a Gaussian prior around the start: --head-prior A is A/2 x |W - start|^2 on the
loss summed over the training images, i.e. A/n on the mean loss of n images, so it weighs less
as there are more photos to learn from (measured: BENCHMARKS.md §10).

With --head-teacher S the logistic probe also learns from what the pretrained classifier would
say: each training photo of a class it knows is fitted to (1 - S) x its label + S x the classifier's
prediction among the known classes, softened by TEMPERATURE (Hinton et al., 2015). Measured on
photos no ImageNet-1k network trained on (BENCHMARKS.md §10, clean splits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.pretrained_classes import HeadPrior

TEMPERATURE = 4.0  # Hinton's softening; 2 helped less on never-seen photos (BENCHMARKS.md §10)


class HeadAnchor:
    """0.5 x sum over rows of strength_r x |W_r - start_r|^2 on the mean loss (biases are not
    penalised): strength --head-prior / images for rows that start from the pretrained classifier,
    --weight-decay for the others."""

    def __init__(self, head: torch.nn.Module, start: torch.Tensor, strengths: torch.Tensor):
        self.head = head
        self.start = start.to(head.weight.device, head.weight.dtype)
        shape = (-1,) + (1,) * (start.ndim - 1)
        self.strengths = strengths.to(head.weight.device, head.weight.dtype).reshape(shape)

    @classmethod
    def of(cls, head: torch.nn.Module, prior: HeadPrior | None, config, images: int) -> "HeadAnchor":
        """The head's anchor for training on `images` images: its prior's rows, or zero (then it is
        plain weight decay)."""
        if prior is None:
            return cls(head, torch.zeros_like(head.weight), torch.full((head.weight.shape[0],), config.weight_decay))
        strengths = torch.where(prior.matched, torch.tensor(config.head_prior / max(images, 1)),
                                torch.tensor(config.weight_decay))
        return cls(head, prior.weight, strengths)

    def penalty(self) -> torch.Tensor:
        return 0.5 * (self.strengths * (self.head.weight - self.start).pow(2)).sum()


class AnchoredLoss(torch.nn.Module):
    """A loss plus the head's anchor penalty (the optimizer then applies no weight decay to the head)."""

    def __init__(self, criterion: torch.nn.Module, anchor: HeadAnchor):
        super().__init__()
        self.criterion, self.anchor = criterion, anchor

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits, targets) + self.anchor.penalty()


def anchored(criterion: torch.nn.Module, model: torch.nn.Module, prior: HeadPrior | None, config,
             images: int) -> torch.nn.Module:
    """`criterion` with the head pulled toward its prior (training on `images` images); unchanged
    where there is none."""
    if prior is None:
        return criterion
    return AnchoredLoss(criterion, HeadAnchor.of(model.get_classifier(), prior, config, images))


def teacher_targets(features: torch.Tensor, labels: torch.Tensor, prior: HeadPrior, share: float) -> torch.Tensor:
    """Soft targets [N, classes] for a linear head on `features` [N, D]: (1 - share) x one-hot +
    share x the pretrained classifier's softened probabilities over the classes it knows, for photos
    of those classes; one-hot for the others (the classifier knows nothing about them)."""
    known = prior.matched.to(features.device)
    weight = prior.weight.to(features.device, features.dtype).reshape(len(known), -1)
    logits = features @ weight.T + (prior.bias.to(features.device, features.dtype) if prior.bias is not None else 0)
    soft = (logits / TEMPERATURE).masked_fill(~known, float("-inf")).softmax(1)
    hard = F.one_hot(labels, len(known)).to(features.dtype)
    return torch.where(known[labels][:, None], (1 - share) * hard + share * soft, hard)
