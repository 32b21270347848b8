"""Cross-fitting: each photo's logits from a model fitted without it (stratified k folds), so that
every labelled photo can judge what a model trained on the others says of a new one. The label
audit finds likely label errors with it; calibration fits its temperature on it when val is small
(`--calibration-fit`): on 10 breeds with 20 val photos, val alone left T at its bound on 4 of 6
runs, while train + val gives five times the photos (BENCHMARKS.md §11b).

The folds are seeded and stratified: photo i of class c (in a seeded shuffle) goes to fold i mod k,
so every fold holds about 1/k of each class."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

FOLDS = 5
BELOW = 200  # --calibration-fit auto cross-fits when val has fewer photos than this (§11b)


def stratified_folds(labels: torch.Tensor, classes: int, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of each photo."""
    generator = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=int)
    array = labels.cpu().numpy()
    for c in range(classes):
        members = np.flatnonzero(array == c)
        fold[generator.permutation(members)] = np.arange(len(members)) % folds
    return fold


def out_of_fold(labels: torch.Tensor, classes: int, fit_and_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                folds: int = FOLDS, seed: int = 0) -> torch.Tensor:
    """[N, classes] outputs: those of each photo from `fit_and_score(fitted_on, held)` (index
    tensors; it fits on the first and returns its outputs on the second) on the fold it was held in."""
    fold = torch.from_numpy(stratified_folds(labels, classes, folds, seed))
    out = None
    for k in range(folds):
        held = torch.nonzero(fold == k).flatten()
        if not len(held):
            continue
        scores = fit_and_score(torch.nonzero(fold != k).flatten(), held)
        if out is None:
            out = torch.zeros(len(labels), scores.shape[1], dtype=scores.dtype)
        out[held] = scores.cpu()
    return out if out is not None else torch.zeros(0, classes)


def wanted(config, val_photos: int) -> bool:
    """--calibration-fit: whether a head on cached features fits its temperature cross-fitted."""
    if not config.calibrate or config.calibration_fit == "val":
        return False
    return config.calibration_fit == "cross-fit" or val_photos < BELOW
