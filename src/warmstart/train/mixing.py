"""Mixup and CutMix (timm's implementation) on training batches of any size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup


class BatchMixer:
    """Mixes a batch's images and returns soft targets; off (labels unchanged) without --mixup/--cutmix.
    Label smoothing stays with the loss, which accepts the soft targets as they are."""

    def __init__(self, config, num_classes: int):
        self.num_classes = num_classes
        self.mixup = None
        if config.mixup or config.cutmix:
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=0.0,
                               num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None:
            return images, labels
        even = len(labels) - len(labels) % 2  # timm mixes pairs; an odd last image stays as it is
        targets = F.one_hot(labels, self.num_classes).float()
        if even:
            images = images.clone()
            images[:even], targets[:even] = self.mixup(images[:even], labels[:even])
        return images, targets
