"""Datasets and loaders that survive unreadable images: a bad file is skipped, never fatal."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import seeds
from .batch import Batch, readable_and_skipped, unreadable
from .batched import DeviceBatches, DevicePipeline, RawImageDataset, TensorView, collate_raw, prepared_ahead
from .images import open_image
from .imageset import ImageSet


class ImageDataset(Dataset):
    """Decoded, transformed images. With `item_seed`, each image's random augmentation depends
    only on (item_seed, index): the same view whatever the worker count or order (cached views)."""

    def __init__(self, images: ImageSet, transform, item_seed: int | None = None):
        self.images = images
        self.transform = transform
        self.item_seed = item_seed

    def __len__(self) -> int:
        return len(self.images)

    def _transform(self, image, index: int, item_seed: int | None):
        if item_seed is None:
            return self.transform(image)
        with seeds.item_random(item_seed, index):
            return self.transform(image)

    def __getitem__(self, key):
        # (augmentation seed, index) from EpochBatches, or a plain index
        seed, index = key if isinstance(key, tuple) else (self.item_seed, key)
        item = self.images.items[index]
        try:
            tensor = self._transform(open_image(item), index, seed)
        except Exception as exc:  # any decoding failure: report it, keep the run alive
            return unreadable(item, exc, index)
        return tensor, self.images.labels[index], index


def collate_skipping(samples) -> Batch:
    good, skipped, skipped_indices = readable_and_skipped(samples)
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


class EpochBatches(Sampler):
    """The batches of each epoch, from (seed, epoch) alone: the same order for images and cached
    features, resumable at any step (set_epoch(epoch, start_batch)), and shardable across ranks
    (each global batch of batch_size x world is split between them). Each sample comes with an
    augmentation seed, so its random view depends on (seed, epoch, index), not on worker state.
    `balance="sampler"` draws classes equally (with replacement)."""

    def __init__(self, labels, batch_size: int, seed: int, balance: str = "none", rank: int = 0, world: int = 1,
                 streams: list[int] | None = None, buffer: int = 0):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size, self.seed, self.balance, self.rank, self.world = batch_size, seed, balance, rank, world
        self.streams, self.buffer = streams, buffer
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_seed(self, epoch: int) -> int:
        return seeds.for_epoch(self.seed, epoch)

    def order(self, epoch: int) -> list[int]:
        generator = seeded_generator(self.epoch_seed(epoch))
        n = len(self.labels)
        if self.balance == "sampler" and n:
            counts = np.bincount(self.labels)
            weights = torch.as_tensor(1.0 / counts[self.labels], dtype=torch.double)
            return torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
        if self.streams is not None:
            return streamed_order(self.streams, self.buffer, generator)
        return torch.randperm(n, generator=generator).tolist()

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.labels) / (self.batch_size * self.world))

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self):
        order, size, seed = self.order(self.epoch), self.batch_size * self.world, self.epoch_seed(self.epoch)
        for j in range(self.start_batch, self.batches_per_epoch()):
            mine = np.array_split(np.asarray(order[j * size:(j + 1) * size]), self.world)[self.rank]
            yield [(seed, int(i)) for i in mine]


def streamed_order(streams: list[int], buffer: int, generator: torch.Generator) -> list[int]:
    """The order a streaming reader gives samples stored in streams (WebDataset shards): the streams
    in a seeded random order, each read front to back, through a seeded shuffle buffer of `buffer`
    samples (each sample read replaces a random one of the buffer, which goes out). Reads stay
    within ~buffer samples of one place in a shard; it is a permutation, drawn from the generator
    alone (the same seed and epoch, the same order: resume restarts at the very batch)."""
    members: dict[int, list[int]] = {}
    for index, stream in enumerate(streams):
        members.setdefault(stream, []).append(index)
    names = list(members)
    read = [i for s in torch.randperm(len(names), generator=generator).tolist() for i in members[names[s]]]
    size = max(1, min(buffer, len(read)))
    held, out = read[:size], []
    draws = torch.randint(0, size, (max(0, len(read) - size),), generator=generator).tolist()
    for incoming, slot in zip(read[size:], draws):
        out.append(held[slot])
        held[slot] = incoming
    return out + [held[i] for i in torch.randperm(len(held), generator=generator).tolist()]


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Loss weights inversely proportional to class frequency (mean 1 over the samples)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


@dataclass(frozen=True)
class Pass:
    """One pass over images with a transform (a split's view), for a loader of several passes."""

    images: ImageSet
    transform: object
    item_seed: int | None = None


def _dataset(images: ImageSet, transform, item_seed: int | None, batched_on: torch.device | None):
    """(dataset, collate, device pipeline or None): the per-sample path, or the batched one where
    `batched_on` is given and the pipeline runs this transform."""
    view = TensorView.of(transform) if batched_on is not None else None
    if view is None:
        return ImageDataset(images, transform, item_seed), collate_skipping, None
    pipeline = DevicePipeline(view, batched_on)  # workers send JPEG bytes only where it decodes them
    return RawImageDataset(images, view, item_seed, pipeline.batch_decode is not None), collate_raw, pipeline


def _worker_count(workers: int | None, images: int, batch_size: int) -> int:
    """No more workers than batches (and none for nothing to load)."""
    workers = default_workers() if workers is None else workers
    return min(workers, max(1, images // batch_size)) if images else 0


def _data_loader(dataset, batching: dict, collate, num_workers: int, seed: int, epochs: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_seed_worker,
        generator=seeded_generator(seeds.for_loader(seed)),
        pin_memory=pin and torch.cuda.is_available(),
        # workers live across epochs instead of restarting (and re-forking the dataset) each epoch
        persistent_workers=epochs > 1 and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def make_loader(images: ImageSet, transform, batch_size: int, workers: int | None = None,
                order: EpochBatches | None = None, item_seed: int | None = None, epochs: int = 1,
                batched_on: torch.device | None = None):
    """Decoded, transformed batches that skip unreadable images. Training passes its `order` (an
    EpochBatches: call loader.batch_sampler.set_epoch); evaluation and extraction go in order.
    With `batched_on` (the batched pipeline), workers only read and the batches are decoded and
    augmented there (data.batched), for every transform that pipeline runs."""
    dataset, collate, pipeline = _dataset(images, transform, item_seed, batched_on)
    batching = {"batch_sampler": order} if order is not None else {"batch_size": batch_size}
    loader = _data_loader(dataset, batching, collate, _worker_count(workers, len(images), batch_size),
                          order.seed if order is not None else 0, epochs, pin=pipeline is None)
    return loader if pipeline is None else DeviceBatches(loader, pipeline)


class _Passes(Dataset):
    """Several passes' datasets behind one index: a key is (pass number, index in the pass)."""

    def __init__(self, datasets: list):
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key):
        number, index = key
        return number, self.datasets[number][index]


class _CollatePasses:
    """A batch (all of one pass) collated by its pass's collate: (pass number, batch)."""

    def __init__(self, collates: list):
        self.collates = collates

    def __call__(self, samples):
        number = samples[0][0]
        return number, self.collates[number]([sample for _, sample in samples])


def passes_loader(passes: list[Pass], batch_size: int, workers: int | None = None,
                  batched_on: torch.device | None = None):
    """The batches of every pass, one pass after the other, from one set of loader workers (no
    start-up cost per pass): yields (pass number, Batch). On the batched pipeline the device stage
    runs ahead in a background thread, as the training loaders' does."""
    parts = [_dataset(p.images, p.transform, p.item_seed, batched_on) for p in passes]
    batches = [[(number, i) for i in range(start, min(start + batch_size, len(p.images)))]
               for number, p in enumerate(passes) for start in range(0, len(p.images), batch_size)]
    loader = _data_loader(_Passes([dataset for dataset, _, _ in parts]), {"batch_sampler": batches},
                          _CollatePasses([collate for _, collate, _ in parts]),
                          _worker_count(workers, sum(len(p.images) for p in passes), batch_size), 0, 1,
                          pin=all(pipeline is None for _, _, pipeline in parts))
    if batched_on is None or all(pipeline is None for _, _, pipeline in parts):
        return iter(loader)

    def prepare(item):
        number, batch = item
        pipeline = parts[number][2]
        return number, (batch if pipeline is None else pipeline(batch))

    return prepared_ahead(loader, prepare, torch.device(batched_on))
