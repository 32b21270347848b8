"""Benchmark 2: full fine-tuning throughput (images/sec over a training epoch) against a plain
timm + PyTorch loop, with warmstart's speed options one at a time and together."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import warmstart
from warmstart.data.loaders import ImageDataset, collate_skipping, default_workers
from warmstart.data.transforms import data_config_for, train_transform
from warmstart.models import create_model

from .common import imagewoof, save, write_manifest

BATCH = 32


def plain_epoch(train_set) -> float:
    """A hand-written fine-tuning epoch: fp32, NCHW, standard augmentation."""
    torch.manual_seed(0)
    model, _, _ = create_model("efficientnet_lite0", len(train_set.class_ids), "bundled")
    model.train()
    loader = DataLoader(ImageDataset(train_set, train_transform(data_config_for(model), "standard")),
                        batch_size=BATCH, shuffle=True, num_workers=default_workers(), collate_fn=collate_skipping)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    start, count = time.perf_counter(), 0
    for batch in loader:
        loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count += len(batch.labels)
    return count / (time.perf_counter() - start)


def warmstart_epoch(manifest_dir: Path, out: Path, **options) -> float:
    result = warmstart.train(warmstart.RunConfig(
        data=str(manifest_dir), strategy="fine-tune", augment="standard", epochs=1, batch_size=BATCH, lr=0.01,
        quiet=True, out=str(out), cache_dir=str(out.parent / "cache"), allow_outside_paths=True, **options))
    return result.metrics["train_images_per_sec"]


def run(quick: bool = False) -> dict:
    splits, _ = imagewoof(quick, train_per_class=16 if quick else 40, val_per_class=2)
    work = Path(tempfile.mkdtemp(prefix="ws-bench-ft-"))
    variants = {
        "fp32, NCHW (as the plain loop)": {"channels_last": False},
        "fp32, channels_last (default)": {},
        "bf16 autocast, channels_last": {"precision": "bf16"},
        "bf16, channels_last, image cache": {"precision": "bf16", "image_cache": True},
    }
    if not quick:
        variants["bf16, channels_last, image cache, compile"] = {"precision": "bf16", "image_cache": True,
                                                                 "compile": True}
    try:
        write_manifest(splits["train"], work / "data" / "train.csv")
        write_manifest(splits["val"], work / "data" / "val.csv")
        plain = plain_epoch(splits["train"])
        ours = {}
        for i, (name, options) in enumerate(variants.items()):
            if options.get("image_cache"):  # the store is built once, before the timed epoch
                warmstart_epoch(work / "data", work / f"warm-{i}", **options)
            ours[name] = warmstart_epoch(work / "data", work / f"run-{i}", **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "full fine-tuning throughput, EfficientNet-Lite0, batch 32, random-resized-crop + flip",
        "quick": quick, "train_images": len(splits["train"]),
        "plain_images_per_sec": plain,
        "warmstart_images_per_sec": ours,
        "ratios": {name: value / plain for name, value in ours.items()},
    }
    save("fine_tune" + ("_quick" if quick else ""), result)
    return result
