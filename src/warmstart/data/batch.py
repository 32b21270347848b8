"""A batch of decoded, transformed images, as every loader hands it over."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]]  # (item, reason) for images that could not be decoded
    skipped_indices: list[int]

    def pin_memory(self) -> "Batch":
        """Page-locked copies (the DataLoader calls this with pin_memory=True): the host-to-GPU copy
        of the next batch then overlaps the current step."""
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())
