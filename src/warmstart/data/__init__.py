"""Data: sources -> labelled splits -> transforms -> loaders."""

from .sources import ImageSet, readable_class_name, resolve_splits, stratified_split
from .transforms import data_config_for, eval_transform, train_transform

__all__ = ["ImageSet", "readable_class_name", "resolve_splits", "stratified_split", "data_config_for",
           "eval_transform", "train_transform"]
