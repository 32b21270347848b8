"""A batch of decoded, transformed images, as every loader hands it over."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]]  # (item, reason) for images that could not be decoded
    skipped_indices: list[int]
