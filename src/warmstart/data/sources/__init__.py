"""Data sources: what `--data` names, as labelled splits. Each source is one module with a
`detect(data)` and a `load(data, class_ids, options)`; SOURCES lists them, first match wins. A new
source is one module and one line here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...errors import UserError
from ..imageset import SPLIT_NAMES, ImageSet, stratified_split
from . import csv_manifest, digits, folder_tree, hf, stanford_dogs, synthetic, webdataset
from .options import SourceOptions

SOURCES = [digits, synthetic, hf, stanford_dogs, webdataset, csv_manifest, folder_tree]
BUILTIN_DIGITS = digits.NAME
SYNTHETIC = synthetic.NAME

__all__ = ["BUILTIN_DIGITS", "SOURCES", "SPLIT_NAMES", "SYNTHETIC", "SourceOptions", "describe_splits",
           "load_source", "resolve_splits"]


def load_source(data: str, class_ids: list[str] | None = None,
                options: SourceOptions = SourceOptions()) -> dict[str, ImageSet]:
    """The splits a data source provides on its own (before any validation carve-out)."""
    source = next((s for s in SOURCES if data and s.detect(data)), None)
    if source is None:
        root = Path(data).expanduser()
        if not data:
            raise UserError("no training data: pass --data ROOT (an image-folder tree, a CSV manifest, WebDataset "
                            "shards or hf:PATH)")
        if not root.exists():
            raise UserError(f"data path {root} does not exist: pass --data ROOT with your images")
        raise UserError(f"--data {root} is a file but not a .csv manifest")
    if options.crop_to_box and not getattr(source, "HAS_BOXES", False):
        raise UserError(f"--crop-to-box needs bounding-box annotations (the Stanford Dogs layout); {data} has none")
    return source.load(data, class_ids, options)


def resolve_splits(data: str, val_fraction: float, seed: int, val_data: str | None = None,
                   class_ids: list[str] | None = None, options: SourceOptions = SourceOptions()) -> dict[str, ImageSet]:
    """train / val (/ test) splits. Validation comes from val/, --val-data, or a seeded
    stratified carve-out of the training images (its `extra["carved"]` says the fraction; 0 for
    none), never from test."""
    splits = load_source(data, class_ids, options)
    if "all" in splits:
        splits["train"] = splits.pop("all")
    train = splits["train"]
    if val_data:
        extra = load_source(val_data, train.class_ids, replace(options, drop_empty_classes=False))
        splits["val"] = extra.get("val") or extra.get("all") or extra.get("test") or extra["train"]
    elif "val" not in splits:
        keep, held = stratified_split(train.labels, val_fraction, seed)
        splits["train"], splits["val"] = train.subset(keep), train.subset(held)
        splits["val"].extra.update(ignored=[], carved=val_fraction)  # skipped files are reported with train
    if len(splits["train"]) == 0:
        raise UserError(f"no training images found in {data}")
    return splits


def describe_splits(splits: dict[str, ImageSet]) -> str:
    """`1,440 train / 360 val (20% of train, seeded) / 960 test images, 120 classes`."""
    train, val = splits["train"], splits["val"]
    carved = val.extra.get("carved")
    if carved == 0:
        val_part = "no validation (--val-fraction 0: the last epoch is kept)"
    elif carved is not None:
        val_part = f"{len(val):,} val ({carved:.0%} of train, seeded)"
    else:
        val_part = f"{len(val):,} val"
    parts = [f"{len(train):,} train", val_part] + ([f"{len(splits['test']):,} test"] if "test" in splits else [])
    return f"{' / '.join(parts)} images, {len(train.class_ids)} classes"
