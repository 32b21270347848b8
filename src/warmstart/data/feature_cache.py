"""The feature cache: a frozen network's outputs computed once, stored on disk, reused.

One folder per (split, key). The key covers everything that changes the features: the frozen
weights' values, the architecture, precision and memory format, the preprocessing (transform),
the augmentation view, and the image list with file sizes and modification times. Rows are
written, flushed, then marked done, so an interrupted extraction resumes where it stopped and
an incomplete cache is never used as complete.

The cache verifies itself before use: every file must have its exact size and shape (numpy
would silently zero-fill a truncated file opened for writing), and every finished row its CRC-32.
A damaged file starts the folder afresh, a damaged row is computed again, each with one warning.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from ..errors import NO_SPACE_ERRNOS, UserError, no_space
from ..files import write_atomically
from ..stop import StopRequest, Stopped, requested
from .fingerprint import fingerprint_items, fingerprint_json
from .loaders import Pass
from .imageset import ImageSet

FORMAT_VERSION = 2
PENDING, DONE, UNREADABLE = 0, 1, 2
FLUSH_EVERY = 8  # batches


@dataclass(frozen=True)
class View:
    """One cached pass over a split: its name, transform, and (for augmented views) its index and
    augmentation stream."""

    name: str
    transform: object
    index: int = 0
    item_seed: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.index == 0 else f"{self.name} view {self.index}"


@dataclass
class CachedFeatures:
    features: torch.Tensor  # [N, D] (or [N, C, H, W] activations), memory-mapped; unreadable rows are zero
    valid: torch.Tensor  # [N] bool
    labels: torch.Tensor  # [N]
    seconds: float = 0.0  # extraction time spent in this call
    computed: int = 0  # rows computed in this call (0: all from the cache)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _write_json_atomically(path: Path, value) -> None:
    write_atomically(path, json.dumps(value), "the feature cache")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _array_problem(path: Path, shape: tuple, dtype) -> str | None:
    """Why the .npy file at `path` is not exactly an array of `shape` and `dtype` (None: it is)."""
    try:
        array = np.load(path, mmap_mode="r")
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        return f"{exc.__class__.__name__}: {str(exc)[:80]}"
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        return f"shape {array.shape} {array.dtype}, expected {tuple(shape)} {np.dtype(dtype)}"
    if size != array.offset + array.nbytes:
        return f"{size} bytes, expected {array.offset + array.nbytes}"
    return None


def reserve(paths: list[Path], folder: Path) -> None:
    """The disk blocks of these files, claimed now: writing a sparse memory map on a full disk is a
    SIGBUS (the process dies without a word), a refused reservation is one line. Files this call
    created empty-handed are removed; rows written before stay."""
    need = 0
    for path in paths:
        with open(path, "r+b") as file:
            size = os.fstat(file.fileno()).st_size
            need += max(0, size - os.fstat(file.fileno()).st_blocks * 512)
            try:
                os.posix_fallocate(file.fileno(), 0, size)
            except OSError as exc:
                if exc.errno not in NO_SPACE_ERRNOS:
                    raise
                raise no_space("the feature cache", folder, need) from None


def row_checksums(array: np.ndarray, rows=None) -> np.ndarray:
    """CRC-32 of each row's bytes (a truncated or zero-filled row cannot keep its checksum); one row
    in memory at a time, so a large memory-mapped cache is never copied whole."""
    rows = range(len(array)) if rows is None else rows
    return np.fromiter((zlib.crc32(np.ascontiguousarray(array[r])) for r in rows), dtype=np.uint32,
                       count=len(rows))


class FeatureCache:
    def __init__(self, root: str | Path, model_fingerprint: str, warn=_warn):
        self.root = Path(root)
        self.model_fingerprint = model_fingerprint
        self.warn = warn

    def key(self, images: ImageSet, view: View, batched: bool = False) -> str:
        batched_pipeline = {"pipeline": "batched"} if batched else {}  # other interpolation kernels
        return fingerprint_json({**batched_pipeline,
            "version": FORMAT_VERSION,
            "model": self.model_fingerprint,
            "transform": repr(view.transform),
            "view": view.index,
            "item_seed": view.item_seed,
            "images": fingerprint_items(images.items),
            "labels": fingerprint_json(list(images.labels)),
        })

    def folder(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:20]}"

    def features(self, view: View, images: ImageSet, forward, loading, batch_size: int, workers: int | None,
                 progress=None) -> CachedFeatures:
        """The features of every image, from the cache where complete, computing what is missing
        (`loading`: the run's Runtime, which loads the images its way and computes on its device)."""
        return self.features_of([(view, images)], forward, loading, batch_size, workers, progress)[0]

    def features_of(self, requests: list[tuple[View, ImageSet]], forward, loading, batch_size: int,
                    workers: int | None, progress=None) -> list[CachedFeatures]:
        """Each (view, images)'s features, as `features`; what is missing in all of them is computed
        through one loader (one set of workers for every view and split)."""
        stores, todos = [], []
        for view, images in requests:
            key = self.key(images, view, loading.runs_batched(view.transform))
            stores.append(_Store(self, self.folder(view.name, key), key, len(images)))
            todos.append(np.flatnonzero(stores[-1].status == PENDING))
        if progress is not None:
            progress(sum(len(images) - len(todo) for (_, images), todo in zip(requests, todos)))
        seconds = [0.0] * len(requests)
        missing = [k for k, todo in enumerate(todos) if len(todo)]
        if missing:
            passes = [Pass(requests[k][1].subset(todos[k].tolist()), requests[k][0].transform,
                           requests[k][0].item_seed) for k in missing]
            spent = _extract([stores[k] for k in missing], [todos[k] for k in missing],
                             loading.passes(passes, batch_size, workers), forward, loading.device, progress)
            for k, value in zip(missing, spent):
                seconds[k] = value
        return [store.result(torch.as_tensor(images.labels, dtype=torch.long), seconds[k], int(len(todos[k])))
                for k, (store, (_, images)) in enumerate(zip(stores, requests))]


class _Store:
    """One cache folder's files, verified and open: rows are written, flushed, then marked done."""

    def __init__(self, cache: FeatureCache, folder: Path, key: str, n: int):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the feature cache folder {folder} ({exc.strerror}): pass a --cache-dir "
                            f"you can write to") from None
        self.folder, self.n, self.warn = folder, n, cache.warn
        self.meta = self._verified_meta(cache, folder, key, n)
        path = folder / "status.npy"
        self.status = (open_memmap(path, mode="r+") if path.is_file()
                       else open_memmap(path, mode="w+", dtype=np.int8, shape=(n,)))
        reserve([path], folder)
        self.skipped = self._skipped(folder, self.status)
        self.features = self.sums = None
        if self.meta["dim"] is not None:
            reserve([folder / "features.npy", folder / "rowsums.npy"], folder)  # (a cache older than the reservation)
            self.features = open_memmap(folder / "features.npy", mode="r+")
            self.sums = open_memmap(folder / "rowsums.npy", mode="r+")
            self._recheck_rows(folder, self.features, self.sums, self.status, self.meta)

    def _verified_meta(self, cache: FeatureCache, folder: Path, key: str, n: int) -> dict:
        """The folder's meta data when the folder is intact; otherwise a fresh start (with a warning
        when something was damaged rather than merely stale)."""
        # what filled it (architecture, precision, memory format, engine, weights), for a person reading it
        fresh = {"key": key, "n": n, "dim": None, "complete": False, "computed_by": cache.model_fingerprint}
        meta_path = folder / "meta.json"
        if not meta_path.is_file() and not (folder / "status.npy").is_file():
            return fresh
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError) as exc:
            problem = f"meta.json is unreadable ({exc.__class__.__name__})"
        else:
            if meta.get("key") != key:
                return self._reset(folder, fresh)  # another key's leftovers: not damage
            problem = _array_problem(folder / "status.npy", (n,), np.int8)
            if problem is None and meta.get("dim") is not None:
                problem = (_array_problem(folder / "features.npy", (n, meta["dim"]), np.float32)
                           or _array_problem(folder / "rowsums.npy", (n,), np.uint32))
                problem = problem and f"features are damaged ({problem})"
            else:
                problem = problem and f"status.npy is damaged ({problem})"
            if problem is None:
                return meta
        self.warn(f"feature cache {folder}: {problem}; computing its features again")
        return self._reset(folder, fresh)

    def _skipped(self, folder: Path, status) -> dict:
        """Why rows were unreadable; if that record is damaged, those rows are tried again."""
        path = folder / "skipped.json"
        if not path.is_file():
            return {}
        try:
            skipped = json.loads(path.read_text())
            if isinstance(skipped, dict):
                return skipped
        except (OSError, ValueError):
            pass
        self.warn(f"feature cache {folder}: skipped.json is damaged; trying its unreadable images again")
        status[np.asarray(status) == UNREADABLE] = PENDING
        status.flush()
        _write_json_atomically(path, {})
        return {}

    @staticmethod
    def _reset(folder: Path, fresh: dict) -> dict:
        for stale in ("features.npy", "rowsums.npy", "status.npy", "skipped.json", "meta.json"):
            (folder / stale).unlink(missing_ok=True)
        return fresh

    def _recheck_rows(self, folder: Path, features, sums, status, meta: dict) -> None:
        """Finished rows whose checksum no longer matches are computed again."""
        done = np.flatnonzero(np.asarray(status) == DONE)
        bad = done[row_checksums(features, done) != np.asarray(sums[done])]
        if len(bad):
            self.warn(f"feature cache {folder}: {len(bad)} row(s) fail their checksum; computing them again")
            status[bad] = PENDING
            status.flush()
            if meta.get("complete"):
                meta["complete"] = False
                _write_json_atomically(folder / "meta.json", meta)

    def write(self, rows: np.ndarray, out: torch.Tensor) -> None:
        if self.features is None:  # the first rows tell the shape: pooled features, or activation maps
            self._create(list(out.shape[1:]), int(out[0].numel()))
        values = out.reshape(len(out), -1).numpy()
        self.features[rows] = values
        self.sums[rows] = row_checksums(values)

    def _create(self, shape: list[int], dim: int) -> None:
        paths = [self.folder / "features.npy", self.folder / "rowsums.npy"]
        features = open_memmap(paths[0], mode="w+", dtype=np.float32, shape=(self.n, dim))
        sums = open_memmap(paths[1], mode="w+", dtype=np.uint32, shape=(self.n,))
        try:
            reserve(paths, self.folder)
        except BaseException:
            for path in paths:  # nothing in them yet: the next run creates them again
                path.unlink(missing_ok=True)
            raise
        self.features, self.sums = features, sums
        self.meta.update(shape=shape, dim=dim)
        _write_json_atomically(self.folder / "meta.json", self.meta)

    def unreadable(self, row: int, item, reason: str) -> None:
        self.skipped[str(row)] = [str(item), reason]
        self.status[row] = UNREADABLE

    def commit(self, rows: list[int]) -> None:
        """Feature rows and their checksums reach the disk before they are marked done."""
        if self.features is not None:
            self.features.flush()
            self.sums.flush()
        self.status[rows] = DONE
        self.status.flush()
        _write_json_atomically(self.folder / "skipped.json", self.skipped)

    def result(self, labels: torch.Tensor, seconds: float, computed: int) -> CachedFeatures:
        if not (self.status == PENDING).any() and not self.meta["complete"]:
            self.meta["complete"] = True
            _write_json_atomically(self.folder / "meta.json", self.meta)
        valid = torch.from_numpy(np.asarray(self.status) == DONE)
        if self.features is not None:
            self.features = None
            # copy-on-write map: rows are read from disk as they are used, never written back
            values = torch.from_numpy(np.load(self.folder / "features.npy", mmap_mode="c"))
            values = values.view(self.n, *self.meta["shape"])
        else:
            values = torch.zeros(self.n, 0)
        return CachedFeatures(values, valid, labels, seconds, computed, [tuple(v) for v in self.skipped.values()])


@contextmanager
def _kept_on_failure(commit):
    """Rows written before an error (a full disk, a failing forward pass) are committed on the way
    out, as on a stop: the next run computes only the rest."""
    try:
        yield
    except BaseException:
        try:
            commit()
        except (OSError, UserError):
            pass  # the disk may be too full even for that: those rows are computed again
        raise


def _extract(stores: list[_Store], todos: list[np.ndarray], loader, forward, device, progress) -> list[float]:
    """Compute the `todo` rows of each store from the loader's (pass number, batch), committing every
    FLUSH_EVERY batches; a stop request commits what is done and stops (the next call continues from
    there). Returns the seconds spent on each store's batches."""
    pending: list[list[int]] = [[] for _ in stores]
    seconds = [0.0] * len(stores)

    def commit() -> None:
        for store, rows in zip(stores, pending):
            store.commit(rows)
            rows.clear()

    with torch.inference_mode(), StopRequest(), _kept_on_failure(commit):
        last = time.perf_counter()
        for count, (number, batch) in enumerate(loader, start=1):
            store, todo = stores[number], todos[number]
            for (item, reason), index in zip(batch.skipped, batch.skipped_indices):
                store.unreadable(int(todo[index]), item, reason)
            if len(batch.labels):
                rows = todo[batch.indices.numpy()]
                store.write(rows, forward(batch.images.to(device)).float().cpu())
                pending[number].extend(rows.tolist())
            if progress is not None:
                progress(len(batch.labels) + len(batch.skipped))
            if count % FLUSH_EVERY == 0 or requested() is not None:
                commit()
            if requested() is not None:
                kept = sum(int((s.status != PENDING).sum()) for s in stores)
                raise Stopped(requested(), f"{kept} of {sum(s.n for s in stores)} rows kept in "
                                           f"{', '.join(str(s.folder) for s in stores)}")
            now = time.perf_counter()
            seconds[number] += now - last
            last = now
    commit()
    return seconds
