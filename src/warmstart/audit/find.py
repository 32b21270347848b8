"""What is wrong with the labels, found from a frozen network's features: likely label errors
(out-of-fold probabilities, then cleanlab's confident learning), near-duplicates (cosine
similarity of the features, and identical files by content hash) and outliers (far from every
other photo)."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict

import numpy as np
import torch

DUPLICATE_SIMILARITY = 0.92  # cosine of the features; measured in benchmarks/audit.py
MAX_NEIGHBOURS = 5  # duplicate pairs kept per photo (its nearest): linear in a burst of copies, never quadratic
OUTLIER_NEIGHBOURS = 5
OUTLIER_Z = 3.0  # flagged: more than this many standard deviations from the typical distance


def probabilities(head: torch.nn.Linear, feats: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(feats).softmax(1).double().numpy()


def out_of_fold(feats: torch.Tensor, labels: torch.Tensor, classes: int, fit, start=None, seed: int = 0) -> np.ndarray:
    """Each photo's class probabilities from a logistic probe (`fit`, from `start`) that never saw
    it (train/cross_fit.py's folds)."""
    from ..train.cross_fit import out_of_fold as cross_fitted
    from ..train.probe import fit_probe

    def fit_and_score(fitted_on: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        head = fit_probe(feats[fitted_on], labels[fitted_on], start, fit, classes)
        return torch.from_numpy(probabilities(head, feats[held]))

    return cross_fitted(labels, classes, fit_and_score, seed=seed).numpy()


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


def near_duplicates(feats: torch.Tensor, threshold: float = DUPLICATE_SIMILARITY, block: int = 1024,
                    neighbours: int = MAX_NEIGHBOURS) -> list[tuple[int, int, float]]:
    """Pairs (i < j) whose features' cosine similarity is at least `threshold`: of each photo, its
    `neighbours` nearest over the threshold (a burst of n near-identical photos gives at most
    n x neighbours pairs, not n^2/2; `duplicate_groups` reports the burst as one group). A block of
    rows at a time: memory block x N."""
    unit = torch.nn.functional.normalize(feats.float(), dim=1)
    k = min(neighbours, len(unit) - 1)
    pairs: dict[tuple[int, int], float] = {}
    if k < 1:
        return []
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        rows = torch.arange(len(similarity))
        similarity[rows, rows + start] = -2.0  # not itself
        values, cols = similarity.topk(k, dim=1)
        keep = values >= threshold
        for r, c, v in zip((rows[:, None].expand_as(cols)[keep] + start).tolist(), cols[keep].tolist(),
                           values[keep].tolist()):
            key = (min(r, c), max(r, c))
            pairs[key] = max(pairs.get(key, -1.0), v)
    return [(a, b, v) for (a, b), v in pairs.items()]


def identical_files(items: list) -> list[tuple[int, int]]:
    """Pairs of photos stored as the same bytes (same size, then the same SHA-256): each copy paired
    with the first of its kind (n copies: n - 1 pairs). Items are paths, or what reads its own
    bytes (a shard's sample, a dataset's row); pixels in memory have no file to compare."""
    by_size = defaultdict(list)
    for i, item in enumerate(items):
        try:
            by_size[_stored_size(item)].append(i)
        except (OSError, TypeError, ValueError):
            continue
    pairs = []
    for group in (g for g in by_size.values() if len(g) > 1):
        by_hash = defaultdict(list)
        for i in group:
            try:
                by_hash[hashlib.sha256(_stored_bytes(items[i])).hexdigest()].append(i)
            except (OSError, ValueError):
                continue
        pairs += [(same[0], other) for same in by_hash.values() for other in same[1:]]
    return pairs


def _stored_size(item) -> int:
    if hasattr(item, "read_bytes"):  # a shard's member knows its size from the index
        return item.size if isinstance(getattr(item, "size", None), int) else len(item.read_bytes())
    if isinstance(item, (str, os.PathLike)):
        return os.path.getsize(item)
    raise TypeError("pixels in memory, or a crop of a file")


def _stored_bytes(item) -> bytes:
    if hasattr(item, "read_bytes"):
        return item.read_bytes()
    with open(item, "rb") as handle:
        return handle.read()


def duplicate_groups(count: int, pairs) -> list[list[int]]:
    """The photos linked by duplicate pairs, as groups of three or more (connected components,
    largest first): a burst of video frames or a placeholder image is one group."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    members = defaultdict(list)
    for i in {i for pair in pairs for i in pair}:
        members[root(i)].append(i)
    return sorted((sorted(g) for g in members.values() if len(g) >= 3), key=lambda g: (-len(g), g[0]))


def outlier_scores(feats: torch.Tensor, neighbours: int = OUTLIER_NEIGHBOURS, block: int = 1024,
                   groups: list[list[int]] = ()) -> np.ndarray:
    """How far each photo is from its nearest others: 1 - mean cosine similarity to its
    `neighbours` nearest (itself and exact copies left out). A group of duplicates counts as one
    photo (its first member stands for it): a burst of copies neither crowds out the neighbours of
    other photos nor moves the typical distance."""
    unit = torch.nn.functional.normalize(feats.float(), dim=1)
    standing = np.ones(len(unit), dtype=bool)
    for group in groups:
        standing[group[1:]] = False
    representatives = unit[torch.from_numpy(standing)]
    k = min(neighbours, len(representatives) - 1)
    scores = np.zeros(len(unit))
    if k < 1:
        return scores
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ representatives.T
        similarity[similarity > 0.999] = -1.0  # itself, and identical photos
        scores[start:start + len(similarity)] = 1 - similarity.topk(k, dim=1).values.mean(1).numpy()
    for group in groups:
        scores[group] = scores[group[0]]
    return scores


def flagged_outliers(scores: np.ndarray, z: float = OUTLIER_Z, groups: list[list[int]] = ()) -> np.ndarray:
    """Indices whose score is more than `z` robust standard deviations above the median (each group
    of duplicates counted once), worst first."""
    counted = np.ones(len(scores), dtype=bool)
    for group in groups:
        counted[group[1:]] = False
    median = np.median(scores[counted]) if counted.any() else 0.0
    spread = 1.4826 * np.median(np.abs(scores[counted] - median)) if counted.any() else 0.0
    flagged = np.flatnonzero((scores - median) / (spread or 1e-9) > z)
    return flagged[np.argsort(-scores[flagged])]
