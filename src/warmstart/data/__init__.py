"""Data: sources -> labelled splits -> transforms -> loaders, and the caches.

The transforms (timm, torch) load on first use, so that image decoding and the sources stay
importable where only onnxruntime is installed (the ONNX predict/serve path).
"""

from .imageset import ImageSet, readable_class_name, stratified_split
from .sources import resolve_splits

__all__ = ["ImageSet", "readable_class_name", "resolve_splits", "stratified_split", "data_config_for",
           "eval_transform", "train_transform"]


def __getattr__(name):
    if name in ("data_config_for", "eval_transform", "train_transform"):
        from . import transforms

        return getattr(transforms, name)
    raise AttributeError(name)
