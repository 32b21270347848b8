"""WebDataset shards: `--data 'PATH/train-{000000..000009}.tar'` (its `val-*`/`test-*` siblings
too), a folder of `.tar` shards, a list file of shards, or a `dataset.yaml` naming the shard sets
and the classes (what `warmstart data pack` writes). Any fsspec URL for a pattern or a list."""

from __future__ import annotations

from ...errors import UserError
from .. import shards
from ..imageset import ImageSet, classes_present, labelled
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
    classes = class_ids or named_classes or classes_present(indexed[first].labels)
    if not classes:
        raise UserError(f"--data {data}: no sample in the training shards has an image and a label, or labels mix "
                        f"class numbers and class names (name the classes in a dataset.yaml)")
    by_index = named_classes is not None or (class_ids is not None and not all(c.isdigit() for c in class_ids))
    return {name: labelled(index.members, index.labels, classes, by_index, origin, index.skipped)
            for name, index in indexed.items()}
