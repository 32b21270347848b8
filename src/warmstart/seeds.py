"""Every random stream of a run, named, from the run's one --seed. A view of an image depends
only on (seed, epoch, index), whatever the worker count or order: exact resume and cached views
rely on it. Changing a formula here changes every cached view's key, so each lives only here."""

from __future__ import annotations

import random
from contextlib import contextmanager

import torch

_PRIME = 1_000_003


def for_epoch(seed: int, epoch: int) -> int:
    """The order of an epoch's batches (and the augmentation seed of its images)."""
    return seed * _PRIME + epoch


def for_item(stream: int, index: int) -> int:
    """One image's random augmentation within a stream (an epoch, or a cached view)."""
    return (stream * _PRIME + index) % 2**63


@contextmanager
def item_random(stream: int, index: int):
    """Python's and torch's random numbers seeded for one image's view (`for_item`), and restored
    after: what a view draws depends on nothing else."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        seed = for_item(stream, index)
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def for_view(seed: int, view: int) -> int:
    """The augmentation stream of cached training view `view` (1, 2, …; view 0 is un-augmented)."""
    return seed * 1000 + view


def for_view_choice(seed: int) -> int:
    """Which cached view each training image shows in an epoch."""
    return seed + 7


def for_loader(seed: int) -> int:
    """The data loader's own generator (worker seeds)."""
    return seed + 1
