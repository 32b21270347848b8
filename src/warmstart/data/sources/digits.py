"""scikit-learn's handwritten digits, embedded (`--data sklearn-digits`): the offline quickstart's data."""

from __future__ import annotations

import numpy as np

from ..imageset import ImageSet
from .options import SourceOptions

NAME = "sklearn-digits"


def detect(data: str) -> bool:
    return data == NAME


def load(data: str, class_ids: list[str] | None, options: SourceOptions) -> dict[str, ImageSet]:
    return {"all": load_digits_images()}


def load_digits_images() -> ImageSet:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as uint8 RGB arrays."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    items = [np.repeat(g[:, :, None], 3, axis=2) for g in gray]
    class_ids = [str(i) for i in range(10)]
    return ImageSet(items, digits.target.tolist(), class_ids, class_ids, NAME)
