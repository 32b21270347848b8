"""Which of the three training paths a run takes, and why: decided here, once.

- cached features: only the head trains and the training views are fixed, so the frozen network
  runs once per image (and view) and the head trains on its stored outputs;
- cached activations (`--cache-boundary`): the frozen prefix runs once, each epoch only the tail;
- images: the whole (or partly frozen) network runs on every batch of images.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.segments import split_at_freeze_boundary
from ..models.trainable import TrainableSet, only_head_trains

FEATURES, ACTIVATIONS, IMAGES = "cached features", "cached activations", "images"


@dataclass
class FitRequest:
    """What a path's trainer is given: the model and what trains, the splits, the session, and
    whether it resumes from a checkpoint or trains on val's images too (a refit)."""

    model: object
    trainable: TrainableSet | None
    splits: dict
    session: object  # train.session.Session
    arch: str = ""
    path: "TrainingPath | None" = None
    resume: dict | None = None
    include_val: bool = False

    def with_val_in_train(self) -> dict:
        """The splits to train on: with `include_val`, train + val and no validation."""
        if not self.include_val:
            return self.splits
        return {"train": self.splits["train"] + self.splits["val"], "val": self.splits["val"].subset([])}


@dataclass
class TrainingPath:
    kind: str
    reason: str
    split: tuple | None = None  # (frozen prefix, trainable tail) for cached activations
    warning: bool = False  # the user asked for a cache that cannot be used here


def choose_training_path(config, model, trainable: TrainableSet, input_size, distributed: bool) -> TrainingPath:
    ruled_out = config.caching_ruled_out_by()
    head_only = hasattr(model, "forward_head") and only_head_trains(model, trainable)
    if ruled_out is None and head_only:
        return TrainingPath(FEATURES, "only the head trains and the training views are fixed: the frozen network "
                                      "runs once per image and view")
    if not config.cache_boundary:
        return TrainingPath(IMAGES, "layers before the head train" if not head_only else ruled_out)
    if ruled_out is not None:
        why = ruled_out
    elif distributed:
        why = "it runs in a single process only"
    else:
        split = split_at_freeze_boundary(model, input_size)
        if split is not None:
            return TrainingPath(ACTIVATIONS, "the frozen prefix runs once per image and view, each epoch only the "
                                             "trainable tail", split)
        why = ("no frozen prefix to cache here (it needs --strategy partial and a model layout with stages, "
               "e.g. ResNet, EfficientNet)")
    return TrainingPath(IMAGES, f"--cache-boundary cannot be used: {why}; training on images", warning=True)
