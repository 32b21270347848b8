"""Random images (`--data synthetic` or `synthetic:N`), like the original demo's synthetic inputter:
they measure the model, not the disk."""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ..imageset import ImageSet
from .options import SourceOptions

NAME = "synthetic"


def detect(data: str) -> bool:
    return data == NAME or data.startswith(NAME + ":")


def load(data: str, class_ids: list[str] | None, options: SourceOptions) -> dict[str, ImageSet]:
    count = data.partition(":")[2]
    if count and not count.isdigit():
        raise UserError(f"--data {data}: use 'synthetic' or 'synthetic:N' with N images")
    return {"all": synthetic_images(int(count) if count else 640)}


def synthetic_images(count: int = 640, num_classes: int = 10, size: int = 256, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    items = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    labels = [i % num_classes for i in range(count)]
    class_ids = [f"class_{i}" for i in range(num_classes)]
    return ImageSet(items, labels, class_ids, class_ids, NAME)
