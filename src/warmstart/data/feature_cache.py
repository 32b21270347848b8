"""The feature cache: a frozen network's outputs computed once, stored on disk, reused.

One folder per (split, key). The key covers everything that changes the features: the frozen
weights' values, the architecture, precision and memory format, the preprocessing (transform),
the augmentation view, and the image list with file sizes and modification times. Rows are
written, flushed, then marked done, so an interrupted extraction resumes where it stopped and
an incomplete cache is never used as complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from .fingerprint import fingerprint_items, fingerprint_json
from .loaders import make_loader
from .sources import ImageSet

FORMAT_VERSION = 1
PENDING, DONE, UNREADABLE = 0, 1, 2
FLUSH_EVERY = 8  # batches


@dataclass
class CachedFeatures:
    features: torch.Tensor  # [N, D] (or [N, C, H, W] activations), memory-mapped; unreadable rows are zero
    valid: torch.Tensor  # [N] bool
    labels: torch.Tensor  # [N]
    seconds: float = 0.0  # extraction time spent in this call
    computed: int = 0  # rows computed in this call (0: all from the cache)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _write_json_atomically(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


class FeatureCache:
    def __init__(self, root: str | Path, model_fingerprint: str):
        self.root = Path(root)
        self.model_fingerprint = model_fingerprint

    def key(self, images: ImageSet, transform, view: int, item_seed: int | None) -> str:
        return fingerprint_json({
            "version": FORMAT_VERSION,
            "model": self.model_fingerprint,
            "transform": repr(transform),
            "view": view,
            "item_seed": item_seed,
            "images": fingerprint_items(images.items),
            "labels": fingerprint_json(list(images.labels)),
        })

    def folder(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:20]}"

    def features(self, name: str, images: ImageSet, transform, forward, batch_size: int, workers: int | None,
                 device, view: int = 0, item_seed: int | None = None, progress=None) -> CachedFeatures:
        """The features of every image, from the cache where complete, computing what is missing."""
        key = self.key(images, transform, view, item_seed)
        folder = self.folder(name, key)
        folder.mkdir(parents=True, exist_ok=True)
        meta_path = folder / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        n = len(images)
        if meta.get("key") != key:
            meta = {"key": key, "n": n, "dim": None, "complete": False}
            for stale in ("features.npy", "status.npy", "skipped.json"):
                (folder / stale).unlink(missing_ok=True)
        status = (open_memmap(folder / "status.npy", mode="r+") if (folder / "status.npy").is_file()
                  else open_memmap(folder / "status.npy", mode="w+", dtype=np.int8, shape=(n,)))
        skipped = json.loads((folder / "skipped.json").read_text()) if (folder / "skipped.json").is_file() else {}
        features = open_memmap(folder / "features.npy", mode="r+") if meta["dim"] is not None else None
        todo = np.flatnonzero(status == PENDING)
        start = time.perf_counter()
        if len(todo):
            if progress is not None:
                progress(n - len(todo))
            loader = make_loader(images.subset(todo.tolist()), transform, batch_size, shuffle=False, seed=0,
                                 workers=workers, item_seed=item_seed)
            pending_rows: list[int] = []
            with torch.inference_mode():
                for count, batch in enumerate(loader, start=1):
                    for (item, reason), index in zip(batch.skipped, batch.skipped_indices):
                        row = int(todo[index])
                        skipped[str(row)] = [str(item), reason]
                        status[row] = UNREADABLE
                    if len(batch.labels):
                        out = forward(batch.images.to(device)).float().cpu()
                        if features is None:
                            meta["shape"] = list(out.shape[1:])  # pooled features, or activation maps
                            meta["dim"] = int(out[0].numel())
                            features = open_memmap(folder / "features.npy", mode="w+", dtype=np.float32,
                                                   shape=(n, meta["dim"]))
                            _write_json_atomically(meta_path, meta)
                        rows = todo[batch.indices.numpy()]
                        features[rows] = out.reshape(len(out), -1).numpy()
                        pending_rows.extend(rows.tolist())
                    if progress is not None:
                        progress(len(batch.labels) + len(batch.skipped))
                    if count % FLUSH_EVERY == 0:
                        self._commit(features, status, pending_rows, skipped, folder)
                        pending_rows = []
            self._commit(features, status, pending_rows, skipped, folder)
        seconds = time.perf_counter() - start
        if not (status == PENDING).any() and not meta["complete"]:
            meta["complete"] = True
            _write_json_atomically(meta_path, meta)
        valid = torch.from_numpy(np.asarray(status) == DONE)
        if features is not None:
            del features
            # copy-on-write map: rows are read from disk as they are used, never written back
            values = torch.from_numpy(np.load(folder / "features.npy", mmap_mode="c")).view(n, *meta["shape"])
        else:
            values = torch.zeros(n, 0)
        return CachedFeatures(values, valid, torch.as_tensor(images.labels, dtype=torch.long), seconds,
                              int(len(todo)), [tuple(v) for v in skipped.values()])

    @staticmethod
    def _commit(features, status, rows, skipped, folder: Path) -> None:
        """Feature rows reach the disk before they are marked done."""
        if features is not None:
            features.flush()
        status[rows] = DONE
        status.flush()
        _write_json_atomically(folder / "skipped.json", skipped)

