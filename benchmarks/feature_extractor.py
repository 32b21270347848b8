"""Benchmark 1 (and 4): the feature-extractor recipe, warmstart (feature cache) against a plain
timm + PyTorch loop that runs the frozen backbone on every image in every epoch.

Both sides: bundled EfficientNet-Lite0, head initialised at zero, no augmentation, SGD momentum
0.9, lr 0.01, weight decay 1e-4, cosine schedule stepped per batch, batch 32, 10 epochs, then
one evaluation on val. Same images, same machine, same process.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import warmstart
from warmstart.data.loaders import ImageDataset, collate_skipping, default_workers
from warmstart.data.transforms import data_config_for, eval_transform
from warmstart.models import apply_strategy, create_model

from .common import Timer, imagewoof, save, write_manifest

EPOCHS, BATCH, LR = 10, 32, 0.01


def plain_loop(splits) -> dict:
    """What a user writes by hand: frozen backbone in eval mode, forward every epoch."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model, _, _ = create_model("efficientnet_lite0", len(splits["train"].class_ids), "bundled")
    apply_strategy(model, "feature-extractor")
    model.eval()  # frozen BatchNorm statistics, as in warmstart
    transform = eval_transform(data_config_for(model))
    loader = DataLoader(ImageDataset(splits["train"], transform), batch_size=BATCH, shuffle=True,
                        num_workers=default_workers(), collate_fn=collate_skipping, persistent_workers=True)
    head_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(head_params, lr=LR, momentum=0.9, weight_decay=1e-4)
    total = EPOCHS * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    with Timer() as training:
        for _ in range(EPOCHS):
            for batch in loader:
                loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    with Timer() as evaluation, torch.inference_mode():
        correct = count = 0
        val_loader = DataLoader(ImageDataset(splits["val"], transform), batch_size=64,
                                num_workers=default_workers(), collate_fn=collate_skipping)
        for batch in val_loader:
            correct += int((model(batch.images).argmax(1) == batch.labels).sum())
            count += len(batch.labels)
    return {"train_seconds": training.seconds, "eval_seconds": evaluation.seconds,
            "end_to_end_seconds": time.perf_counter() - start, "top1": correct / count,
            "forward_images_per_sec": EPOCHS * len(splits["train"]) / training.seconds}


def warmstart_run(manifest_dir: Path, out: Path, precision: str = "fp32") -> dict:
    start = time.perf_counter()
    result = warmstart.train(warmstart.RunConfig(
        data=str(manifest_dir), augment="none", epochs=EPOCHS, batch_size=BATCH, lr=LR, weight_decay=1e-4,
        schedule="cosine", precision=precision, quiet=True, out=str(out), allow_outside_paths=True))
    m = result.metrics
    return {"train_seconds": m["train_seconds"], "eval_seconds": m["eval_seconds"],
            "end_to_end_seconds": time.perf_counter() - start, "top1": m["top1"],
            "feature_extraction_seconds": m["feature_extraction_seconds"],
            "extraction_images_per_sec": m["train_images"] / m["feature_extraction_seconds"]}


def run(quick: bool = False) -> dict:
    splits, _ = imagewoof(quick)
    work = Path(tempfile.mkdtemp(prefix="ws-bench-fe-"))
    try:
        write_manifest(splits["train"], work / "data" / "train.csv")
        write_manifest(splits["val"], work / "data" / "val.csv")
        plain = plain_loop(splits)
        ours = warmstart_run(work / "data", work / "run-fp32")
        ours_bf16 = warmstart_run(work / "data", work / "run-bf16", "bf16")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "feature-extractor recipe, 10 epochs, bundled EfficientNet-Lite0 on imagewoof-mini",
        "quick": quick, "train_images": len(splits["train"]), "val_images": len(splits["val"]),
        "plain": plain, "warmstart": ours, "warmstart_bf16": ours_bf16,
        "train_phase_ratio": plain["train_seconds"] / ours["train_seconds"],
        "end_to_end_ratio": plain["end_to_end_seconds"] / ours["end_to_end_seconds"],
        "top1_difference_points": 100 * (ours["top1"] - plain["top1"]),
        "bf16_train_phase_ratio": plain["train_seconds"] / ours_bf16["train_seconds"],
        "bf16_end_to_end_ratio": plain["end_to_end_seconds"] / ours_bf16["end_to_end_seconds"],
        "bf16_top1_difference_points": 100 * (ours_bf16["top1"] - plain["top1"]),
        "extraction_vs_plain_forward": ours["extraction_images_per_sec"] / plain["forward_images_per_sec"],
    }
    save("feature_extractor" + ("_quick" if quick else ""), result)
    return result
