"""What is wrong with the labels, found from a frozen network's features: likely label errors
(out-of-fold probabilities, then cleanlab's confident learning), near-duplicates (cosine
similarity of the features, and identical files by content hash) and outliers (far from every
other photo)."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import torch

DUPLICATE_SIMILARITY = 0.92  # cosine of the features; measured in benchmarks/audit.py
OUTLIER_NEIGHBOURS = 5
OUTLIER_Z = 3.0  # flagged: more than this many standard deviations from the typical distance


def fit_head(feats: torch.Tensor, labels: torch.Tensor, classes: int, config, prior=None) -> torch.nn.Linear:
    """A logistic-regression head on the features, as `--recipe linear-probe` fits one (L-BFGS,
    the pretrained classifier's rows as start and pull where its classes match)."""
    from ..train.head import LogisticProbe

    head = torch.nn.Linear(feats.shape[-1], classes)
    with torch.no_grad():
        head.weight.copy_(prior.weight if prior is not None else torch.zeros_like(head.weight))
        head.bias.copy_(prior.bias if prior is not None and prior.bias is not None else torch.zeros(classes))
    probe = LogisticProbe(head, feats[None], labels, torch.nn.CrossEntropyLoss(), config, prior)
    for _ in range(10):
        probe.step()
    return head


def probabilities(head: torch.nn.Linear, feats: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(feats).softmax(1).double().numpy()


def out_of_fold(feats: torch.Tensor, labels: torch.Tensor, classes: int, config, prior=None, folds: int = 5,
                seed: int = 0) -> np.ndarray:
    """Each photo's class probabilities from a head that never saw it (stratified k folds)."""
    generator = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=int)
    for c in range(classes):
        members = np.flatnonzero(labels.numpy() == c)
        fold[generator.permutation(members)] = np.arange(len(members)) % folds
    probs = np.zeros((len(labels), classes))
    for k in range(folds):
        held = torch.from_numpy(fold == k)
        if held.any():
            head = fit_head(feats[~held], labels[~held], classes, config, prior)
            probs[held.numpy()] = probabilities(head, feats[held])
    return probs


def label_issues(labels: np.ndarray, probs: np.ndarray) -> list[tuple[int, int, float]]:
    """(index, suggested class, label quality) of the photos confident learning finds mislabelled,
    most likely first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = probs / probs.sum(1, keepdims=True)
    if len(np.unique(labels)) < 2 or len(labels) < 2 * probs.shape[1]:
        return []
    found = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs)
    return [(int(i), int(probs[i].argmax()), float(quality[i])) for i in found]


def near_duplicates(feats: torch.Tensor, threshold: float = DUPLICATE_SIMILARITY, block: int = 1024
                    ) -> list[tuple[int, int, float]]:
    """Pairs (i < j) whose features' cosine similarity is at least `threshold`, a block of rows
    at a time (memory: block x N)."""
    unit = torch.nn.functional.normalize(feats.float(), dim=1)
    pairs = []
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        rows, cols = torch.nonzero(similarity >= threshold, as_tuple=True)
        for r, c in zip((rows + start).tolist(), cols.tolist()):
            if r < c:
                pairs.append((r, c, float(similarity[r - start, c])))
    return pairs


def identical_files(paths: list[str]) -> list[tuple[int, int]]:
    """Pairs of files with the same bytes (same size, then the same SHA-256)."""
    by_size = defaultdict(list)
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as handle:
                by_size[handle.seek(0, 2)].append(i)
        except (OSError, TypeError):
            continue
    pairs = []
    for group in (g for g in by_size.values() if len(g) > 1):
        by_hash = defaultdict(list)
        for i in group:
            with open(paths[i], "rb") as handle:
                by_hash[hashlib.sha256(handle.read()).hexdigest()].append(i)
        pairs += [(a, b) for same in by_hash.values() for k, a in enumerate(same) for b in same[k + 1:]]
    return pairs


def outlier_scores(feats: torch.Tensor, neighbours: int = OUTLIER_NEIGHBOURS, block: int = 1024) -> np.ndarray:
    """How far each photo is from its nearest others: 1 - mean cosine similarity to its
    `neighbours` nearest (itself and exact copies left out)."""
    unit = torch.nn.functional.normalize(feats.float(), dim=1)
    k = min(neighbours, len(unit) - 1)
    scores = np.zeros(len(unit))
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        similarity[similarity > 0.999] = -1.0  # itself, and identical photos
        scores[start:start + len(similarity)] = 1 - similarity.topk(k, dim=1).values.mean(1).numpy()
    return scores


def flagged_outliers(scores: np.ndarray, z: float = OUTLIER_Z) -> np.ndarray:
    """Indices whose score is more than `z` robust standard deviations above the median, worst first."""
    median = np.median(scores)
    spread = 1.4826 * np.median(np.abs(scores - median)) or 1e-9
    flagged = np.flatnonzero((scores - median) / spread > z)
    return flagged[np.argsort(-scores[flagged])]
