"""The pre-resized image cache: decode each image once, resize it to the short side the
transforms need, and keep the pixels in one memory-mapped uint8 file that epochs read.

Evaluation views from the cache are identical to decoding the original files (the evaluation
transform's own resize is applied once, here, and is a no-op afterwards); training crops are
taken from the resized image instead of the original.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..stop import check
from .fingerprint import fingerprint_items, fingerprint_json
from .loaders import make_loader
from .imageset import ImageSet

FORMAT_VERSION = 1
_STORES: dict[str, np.memmap] = {}  # opened lazily, once per process (loader workers included)


@dataclass(frozen=True)
class PreResized:
    store: str
    offset: int
    height: int
    width: int
    source: str  # the original file, for messages

    def __str__(self) -> str:
        return self.source

    def pixels(self) -> np.ndarray:
        store = _STORES.get(self.store)
        if store is None:
            store = _STORES[self.store] = np.memmap(self.store, dtype=np.uint8, mode="c")  # writable views, never written
        size = self.height * self.width * 3
        return np.asarray(store[self.offset:self.offset + size]).reshape(self.height, self.width, 3)


def _decode_resized(resize):
    def transform(image):
        return torch.as_tensor(np.asarray(resize(image), dtype=np.uint8))
    return transform


def cached_images(images: ImageSet, resize, root: Path, workers: int | None = None, progress=None,
                  make_loader=make_loader) -> ImageSet:
    """`images` served from the pre-resized store (built on first use, read through `make_loader`:
    a run passes its Runtime's). Unreadable images keep their original item, so the loader skips
    them with the decoder's reason as before."""
    key = fingerprint_json({"version": FORMAT_VERSION, "images": fingerprint_items(images.items),
                            "resize": repr(resize)})
    folder = Path(root) / f"images-{key[:20]}"
    if not (folder / "index.json").is_file():
        _build(images, resize, folder, make_loader(images, _decode_resized(resize), 1, workers), progress)
    elif progress is not None:
        progress(len(images))
    index = json.loads((folder / "index.json").read_text())
    store = str((folder / "pixels.u8").resolve())
    items = [PreResized(store, off, h, w, str(item)) if off >= 0 else item
             for item, (off, h, w) in zip(images.items, index["entries"])]
    return ImageSet(items, list(images.labels), images.class_ids, images.class_names, images.origin,
                    dict(images.extra))


def _build(images: ImageSet, resize, folder: Path, loader, progress) -> None:
    """Written into a temporary folder and renamed: an interrupted build is never taken as complete.
    `loader`: batches of one decoded, resized image (an unreadable one is skipped: it keeps its file)."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"cannot create the image cache folder {tmp} ({exc.strerror}): pass a --cache-dir you can "
                        f"write to") from None
    entries = [(-1, 0, 0)] * len(images)
    offset = 0
    with (tmp / "pixels.u8").open("wb") as out:
        for batch in loader:
            check()  # an interrupted build is started again next time (its .partial folder is not used)
            for array, index in zip(batch.images.numpy(), batch.indices.tolist()):
                out.write(array.tobytes())
                entries[index] = (offset, int(array.shape[0]), int(array.shape[1]))
                offset += array.nbytes
            if progress is not None:
                progress(len(batch.labels) + len(batch.skipped))
        out.flush()
        os.fsync(out.fileno())
    (tmp / "index.json").write_text(json.dumps({"entries": entries}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
