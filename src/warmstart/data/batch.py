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


def reason(exc: Exception) -> str:
    """Why an image was skipped, as skipped.txt and the warnings say it."""
    return f"{exc.__class__.__name__}: {exc}"


def unreadable(item, exc: Exception, index: int) -> tuple:
    """What a dataset returns for an image it could not read or decode: the loader skips it, says why."""
    return None, str(item), reason(exc), index


def readable_and_skipped(samples) -> tuple[list, list[tuple[str, str]], list[int]]:
    """A batch's samples split into the readable ones and the skipped (item, reason) with their indices."""
    bad = [s for s in samples if s[0] is None]
    return [s for s in samples if s[0] is not None], [(s[1], s[2]) for s in bad], [s[3] for s in bad]
