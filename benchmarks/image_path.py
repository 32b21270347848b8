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


def batched_per_sec(images, transform, batch: int = 32) -> float:
    """The batched pipeline on CPU tensors (data.batched): JPEG bytes decoded by torchvision (cache
    entries as they are), cropped and resized with torch's antialiased kernels, a batch at a time."""
    import torch

    from warmstart.data.batched import DevicePipeline, RawImageDataset, TensorView, collate_raw

    view = TensorView.of(transform)
    raw, pipeline = RawImageDataset(images, view, item_seed=0), DevicePipeline(view, torch.device("cpu"))
    with Timer() as timer:
        for start in range(0, len(images), batch):
            pipeline(collate_raw([raw[i] for i in range(start, min(start + batch, len(images)))]))
    return len(images) / timer.seconds


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
            "batched_jpeg_eval_images_per_sec": batched_per_sec(images, evaluation),
            "batched_cache_eval_images_per_sec": batched_per_sec(cached, evaluation),
            "batched_jpeg_train_images_per_sec": batched_per_sec(images, training),
            "batched_cache_train_images_per_sec": batched_per_sec(cached, training),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["decode_ratio"] = result["cache_decode_images_per_sec"] / result["jpeg_decode_images_per_sec"]
    result["eval_ratio"] = result["cache_eval_images_per_sec"] / result["jpeg_eval_images_per_sec"]
    result["train_ratio"] = result["cache_train_images_per_sec"] / result["jpeg_train_images_per_sec"]
    for view in ("eval", "train"):  # against the per-sample path on the original JPEGs
        for source in ("jpeg", "cache"):
            result[f"batched_{source}_{view}_ratio"] = (result[f"batched_{source}_{view}_images_per_sec"]
                                                        / result[f"jpeg_{view}_images_per_sec"])
    save("image_path" + ("_quick" if quick else ""), result)
    return result
