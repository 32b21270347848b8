"""Datasets and loaders that survive unreadable images: a bad file is skipped, never fatal."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .images import open_image
from .sources import ImageSet


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]]  # (item, reason) for images that could not be decoded


class ImageDataset(Dataset):
    def __init__(self, images: ImageSet, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.images.items[index]
        try:
            tensor = self.transform(open_image(item))
        except Exception as exc:  # any decoding failure: report it, keep the run alive
            return None, str(item), f"{exc.__class__.__name__}: {exc}"
        return tensor, self.images.labels[index], index


def collate_skipping(samples) -> Batch:
    good = [s for s in samples if s[0] is not None]
    skipped = [(s[1], s[2]) for s in samples if s[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    return Batch(
        torch.stack([s[0] for s in good]),
        torch.tensor([s[1] for s in good], dtype=torch.long),
        torch.tensor([s[2] for s in good], dtype=torch.long),
        skipped,
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


def make_loader(
    images: ImageSet, transform, batch_size: int, shuffle: bool, seed: int, workers: int | None = None
) -> DataLoader:
    workers = default_workers() if workers is None else workers
    dataset = ImageDataset(images, transform)
    # the sampler owns its generator, so the data order depends on the seed alone
    # (not on worker seeding), exactly as in training from cached features
    sampler = RandomSampler(dataset, generator=seeded_generator(seed)) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=min(workers, max(1, len(images) // batch_size)) if len(images) else 0,
        collate_fn=collate_skipping,
        worker_init_fn=_seed_worker,
        generator=seeded_generator(seed + 1),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
