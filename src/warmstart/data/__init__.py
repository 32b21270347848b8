"""Data: sources -> labelled splits -> transforms -> loaders, and the caches.

The transforms (timm, torch) load on first use, so that image decoding and the sources stay
importable where only onnxruntime is installed (the ONNX predict/serve path).
"""

from .imageset import ImageSet, readable_class_name, stratified_split
from .sources import SourceOptions, load_source, resolve_splits

__all__ = ["ImageSet", "pack", "readable_class_name", "resolve_splits", "stratified_split", "data_config_for",
           "eval_transform", "train_transform"]


def pack(data: str, out: str, shard_size: int = 1000, options: SourceOptions = SourceOptions(), say=print):
    """`warmstart data pack`: the splits of any data warmstart reads as WebDataset shards in OUT, with
    the dataset.yaml that `--data OUT` (or `--data OUT/dataset.yaml`) reads. Returns the yaml's path."""
    from ..errors import UserError
    from .shards import pack as write_shards

    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: a shard holds at least one sample")
    splits = load_source(data, options=options)
    if "all" in splits:
        splits = {"train": splits.pop("all"), **splits}
    for images in splits.values():
        for item, reason in images.ignored:
            say(f"warning: skipped {item}: {reason}")
    return write_shards(splits, out, shard_size, say)


def __getattr__(name):
    if name in ("data_config_for", "eval_transform", "train_transform"):
        from . import transforms

        return getattr(transforms, name)
    raise AttributeError(name)
