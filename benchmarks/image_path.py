"""Benchmark 3: the image path, decoding the original JPEGs against the pre-resized image cache.
Images/sec of a single process producing model-ready tensors, evaluation and training views."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from warmstart.data.image_cache import cached_images
from warmstart.data.loaders import ImageDataset
from warmstart.data.transforms import eval_transform, train_transform
from warmstart.models import build_model
from warmstart.data.transforms import data_config_for

from .common import Timer, imagewoof, save


def images_per_sec(images, transform) -> float:
    dataset = ImageDataset(images, transform)
    with Timer() as timer:
        for i in range(len(dataset)):
            dataset[i]
    return len(dataset) / timer.seconds


def decoded_per_sec(images) -> float:
    """Decoding alone: original JPEG -> RGB image, or the store's pixels -> RGB image."""
    from warmstart.data.images import open_image

    with Timer() as timer:
        for item in images.items:
            open_image(item).load()
    return len(images) / timer.seconds


def run(quick: bool = False) -> dict:
    splits, _ = imagewoof(quick, train_per_class=30 if quick else None, val_per_class=1)
    images = splits["train"]
    config = data_config_for(build_model("tf_efficientnet_lite0", 10))
    evaluation, training = eval_transform(config), train_transform(config, "standard")
    work = Path(tempfile.mkdtemp(prefix="ws-bench-img-"))
    try:
        with Timer() as build:
            cached = cached_images(images, evaluation.transforms[0], work, workers=0)
        result = {
            "benchmark": "image path: original JPEG decode vs pre-resized uint8 store (one process)",
            "quick": quick, "images": len(images),
            "cache_build_seconds": build.seconds,
            "cache_bytes": (next(work.glob("images-*")) / "pixels.u8").stat().st_size,
            "jpeg_decode_images_per_sec": decoded_per_sec(images),
            "cache_decode_images_per_sec": decoded_per_sec(cached),
            "jpeg_eval_images_per_sec": images_per_sec(images, evaluation),
            "cache_eval_images_per_sec": images_per_sec(cached, evaluation),
            "jpeg_train_images_per_sec": images_per_sec(images, training),
            "cache_train_images_per_sec": images_per_sec(cached, training),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["decode_ratio"] = result["cache_decode_images_per_sec"] / result["jpeg_decode_images_per_sec"]
    result["eval_ratio"] = result["cache_eval_images_per_sec"] / result["jpeg_eval_images_per_sec"]
    result["train_ratio"] = result["cache_train_images_per_sec"] / result["jpeg_train_images_per_sec"]
    save("image_path" + ("_quick" if quick else ""), result)
    return result
