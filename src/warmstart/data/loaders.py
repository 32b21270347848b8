"""Datasets and loaders that survive unreadable images: a bad file is skipped, never fatal."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from .images import open_image
from .sources import ImageSet


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]]  # (item, reason) for images that could not be decoded
    skipped_indices: list[int]


class ImageDataset(Dataset):
    """Decoded, transformed images. With `item_seed`, each image's random augmentation depends
    only on (item_seed, index): the same view whatever the worker count or order (cached views)."""

    def __init__(self, images: ImageSet, transform, item_seed: int | None = None):
        self.images = images
        self.transform = transform
        self.item_seed = item_seed

    def __len__(self) -> int:
        return len(self.images)

    def _transform(self, image, index: int):
        if self.item_seed is None:
            return self.transform(image)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = (self.item_seed * 1_000_003 + index) % 2**63
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(image)
            finally:
                random.setstate(state)

    def __getitem__(self, index: int):
        item = self.images.items[index]
        try:
            tensor = self._transform(open_image(item), index)
        except Exception as exc:  # any decoding failure: report it, keep the run alive
            return None, str(item), f"{exc.__class__.__name__}: {exc}", index
        return tensor, self.images.labels[index], index


def collate_skipping(samples) -> Batch:
    good = [s for s in samples if s[0] is not None]
    bad = [s for s in samples if s[0] is None]
    skipped, skipped_indices = [(s[1], s[2]) for s in bad], [s[3] for s in bad]
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return Batch(torch.empty(0), empty, empty, skipped, skipped_indices)
    return Batch(
        torch.stack([s[0] for s in good]),
        torch.tensor([s[1] for s in good], dtype=torch.long),
        torch.tensor([s[2] for s in good], dtype=torch.long),
        skipped,
        skipped_indices,
    )


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus))


def seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_sampler(labels, seed: int, balance: str = "none"):
    """Shuffling with its own seeded generator, so the data order depends on the seed alone
    (the same for images and for cached features); `sampler` balance draws classes equally."""
    if balance == "sampler":
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        return WeightedRandomSampler(weights, len(labels), replacement=True, generator=seeded_generator(seed))
    return RandomSampler(range(len(labels)), generator=seeded_generator(seed))


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Loss weights inversely proportional to class frequency (mean 1 over the samples)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


def make_loader(
    images: ImageSet, transform, batch_size: int, shuffle: bool, seed: int, workers: int | None = None,
    balance: str = "none", item_seed: int | None = None, epochs: int = 1,
) -> DataLoader:
    workers = default_workers() if workers is None else workers
    dataset = ImageDataset(images, transform, item_seed)
    sampler = make_sampler(images.labels, seed, balance) if shuffle else None
    num_workers = min(workers, max(1, len(images) // batch_size)) if len(images) else 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        worker_init_fn=_seed_worker,
        generator=seeded_generator(seed + 1),
        pin_memory=torch.cuda.is_available(),
        # workers live across epochs instead of restarting (and re-forking the dataset) each epoch
        persistent_workers=epochs > 1 and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
