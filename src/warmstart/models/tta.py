"""Test-time augmentation: the image and its mirror image, probabilities averaged."""

from __future__ import annotations

import torch
from torch import nn


def average_views(*logits: torch.Tensor) -> torch.Tensor:
    """Log of the mean probability over views: argmax and softmax give the averaged prediction."""
    return torch.stack([view.float().softmax(1) for view in logits]).mean(0).log()


def combine_views(logits: list[torch.Tensor]) -> torch.Tensor:
    """One view's logits as they are; several views averaged (`average_views`)."""
    return average_views(*logits) if len(logits) > 1 else logits[0]


class FlipTTA(nn.Module):
    """Wraps a classifier so that every forward pass averages the image and its horizontal flip
    (what `--tta` runs use at evaluation, prediction, serving and export)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # one pass over both views: one copy of the network in an exported graph (and of its int8
        # weights), and a batch of two where a single photo is asked for
        views = self.model(torch.cat([images, images.flip(3)])).unflatten(0, (2, -1))
        return average_views(views[0], views[1])
