"""WebDataset shards: `--data 'PATH/train-{000000..000009}.tar'` (its `val-*`/`test-*` siblings
too), a folder of `.tar` shards, a list file of shards, or a `dataset.yaml` naming the shard sets
and the classes (what `warmstart data pack` writes). Any fsspec URL for a pattern or a list."""

from __future__ import annotations

from ...errors import UserError
from .. import shards
from ..imageset import ImageSet, readable_class_names
from .options import SourceOptions


def detect(data: str) -> bool:
    return shards.looks_like_shards(data)


def load(data: str, class_ids: list[str] | None, options: SourceOptions) -> dict[str, ImageSet]:
    sets, named_classes, origin = shards.split_sets(data)
    if not any(sets.values()):
        raise UserError(f"--data {data} names no shards: expected a pattern such as 'train-{{000000..000009}}.tar', "
                        f"a folder of .tar files, or a dataset.yaml")
    first = "train" if "train" in sets else "all"
    local = [s for s in sets.get(first, []) if shards.is_local(s)]
    if local and len(local) == len(sets[first]) and not any(shards.local_path(s).is_file() for s in local):
        raise UserError(f"--data {data}: none of its {len(local)} {first} shard(s) exists, e.g. {local[0]}: "
                        f"check the pattern")
    indexed = {name: shards.index_shards(sets[name]) for name in (first, *[n for n in sets if n != first])}
    classes = class_ids or named_classes or _classes_from(indexed[first].labels, data)
    by_index = named_classes is not None or (class_ids is not None and not all(c.isdigit() for c in class_ids))
    return {name: _image_set(index, classes, by_index, origin) for name, index in indexed.items()}


def _classes_from(labels: list, data: str) -> list[str]:
    """Without a class list: the numbers present (in numeric order), or the names (sorted)."""
    if not labels:
        raise UserError(f"--data {data}: no sample in the training shards has an image and a label")
    if all(isinstance(label, int) for label in labels):
        return [str(n) for n in sorted(set(labels))]
    if all(isinstance(label, str) for label in labels):
        return sorted(set(labels))
    raise UserError(f"--data {data}: labels mix class numbers and class names; name the classes in a dataset.yaml")


def _image_set(index: shards.ShardIndex, classes: list[str], by_index: bool, origin: str) -> ImageSet:
    position = {c: i for i, c in enumerate(classes)}
    items, labels, skipped = [], [], list(index.skipped)
    for member, raw in zip(index.members, index.labels):
        if isinstance(raw, int) and by_index:
            label = raw if 0 <= raw < len(classes) else None
        else:
            label = position.get(str(raw))
        if label is None:
            skipped.append((str(member), f"label {raw!s:.40} is not one of the {len(classes)} classes: left out"))
            continue
        items.append(member)
        labels.append(label)
    return ImageSet(items, labels, list(classes), readable_class_names(classes), origin, {"ignored": skipped})
