"""Labelled images of one split, and the names of their classes."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
# what a folder, a file or a dataset's split may be called, and the split it is
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "eval": "val", "test": "test"}


@dataclass
class ImageSet:
    """Labelled images of one split. Items are file paths, or arrays for embedded data."""

    items: list[Any]
    labels: list[int]
    class_ids: list[str]
    class_names: list[str]
    origin: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(
            [self.items[i] for i in indices], [self.labels[i] for i in indices],
            self.class_ids, self.class_names, self.origin, dict(self.extra),
        )

    def __add__(self, other: "ImageSet") -> "ImageSet":
        """The images of both (same classes), e.g. train + val for a refit."""
        if other.class_ids != self.class_ids:
            raise ValueError("only image sets of the same classes add up")
        return ImageSet(self.items + other.items, self.labels + other.labels, self.class_ids, self.class_names,
                        self.origin, {"ignored": []})

    @property
    def ignored(self) -> list[tuple[str, str]]:
        """Files found beside the images that are not images: (path, reason)."""
        return self.extra.get("ignored", [])

    def class_counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.class_ids)).tolist()


def classes_present(labels: list) -> list[str] | None:
    """A source's classes from raw labels alone: the numbers present (in numeric order), or the
    names (sorted); None where they mix or there are none."""
    if labels and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return [str(n) for n in sorted(set(labels))]
    if labels and all(isinstance(v, str) for v in labels):
        return sorted(set(labels))
    return None


def labelled(items: list, raw: list, classes: list[str], by_index: bool, origin: str,
             skipped: list[tuple[str, str]]) -> ImageSet:
    """The items whose raw label is one of the classes (an index into them where `by_index`, else a
    class id, a number matched as its text); the others go to `skipped`, a line each."""
    position = {c: i for i, c in enumerate(classes)}
    kept, labels, skipped = [], [], list(skipped)
    for item, value in zip(items, raw):
        if isinstance(value, int) and not isinstance(value, bool) and by_index:
            label = value if 0 <= value < len(classes) else None
        else:
            label = position.get(str(value)) if value is not None else None
        if label is None:
            reason = ("no label" if value is None or value == -1
                      else f"label {value!s:.40} is not one of the {len(classes)} classes")
            skipped.append((str(item), reason + ": left out"))
            continue
        kept.append(item)
        labels.append(label)
    return ImageSet(kept, labels, list(classes), readable_class_names(classes), origin, {"ignored": skipped})


_WNID_NAME = re.compile(r"^(n\d{8})[-_](.+)$")
_WNID = re.compile(r"^n\d{8}$")


def readable_class_name(folder: str) -> str:
    """`n02085620-Chihuahua` -> `Chihuahua`; a bare ImageNet id -> its ImageNet name."""
    match = _WNID_NAME.match(folder)
    if match:
        return match.group(2).replace("_", " ")
    if _WNID.match(folder):
        try:
            from timm.data import ImageNetInfo

            return ImageNetInfo().label_name_to_description(folder).split(",")[0]
        except Exception:  # not an ImageNet-1k id: keep the folder name
            return folder
    return folder


def readable_class_names(class_ids: Sequence[str]) -> list[str]:
    """Each class's readable name, unique: classes that would share one (`n02099601`, `golden
    retriever` and `n11111111-golden_retriever` all read "golden retriever") keep their folder
    names, which are unique, so that predictions never name two classes alike."""
    names = [readable_class_name(c) for c in class_ids]
    while len(set(names)) < len(names):
        counts = Counter(names)
        names = [c if counts[n] > 1 else n for c, n in zip(class_ids, names)]
    return names


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, stratified split into (keep, held_out) index lists; every class keeps >= 1 image
    (and gives >= 1 when it can, unless the fraction is 0: nothing held out)."""
    if fraction <= 0:
        return list(range(len(labels))), []
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keep, held = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.extend(idx[:n_held].tolist())
        keep.extend(idx[n_held:].tolist())
    return sorted(keep), sorted(held)
