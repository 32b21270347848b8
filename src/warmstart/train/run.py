"""One training run, end to end: data, model, weights, strategy, loop, artifacts, evaluation."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import RunConfig
from ..data.sources import resolve_splits
from ..data.image_cache import cached_images
from ..data.transforms import data_config_for, eval_transform
from ..evaluate import EvalResult, evaluate_model, metrics_from_logits
from ..models.create import create_model
from ..models.registry import resolve_architecture
from ..models.trainable import apply_strategy
from ..run_dir import new_run_dir, save_model
from .history import TrainingLog
from .loop import Reporter, Runtime, fit


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    evaluation: EvalResult
    history: list[dict]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_items(images, count: int = 8) -> list:
    """Up to `count` images for the per-epoch prediction grid, one class after another."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(images.labels):
        by_class.setdefault(label, []).append(i)
    picked = []
    while len(picked) < min(count, len(images)):
        for indices in by_class.values():
            if indices and len(picked) < count:
                picked.append(indices.pop(0))
    return [(images.items[i], images.labels[i]) for i in picked]


def _with_image_cache(splits: dict, data_config: dict, cache_dir: Path, config, reporter) -> dict:
    """Serve every split from the pre-resized image store (built on first use)."""
    resize = eval_transform(data_config).transforms[0]
    out = {}
    for name, images in splits.items():
        with reporter.bar(len(images), f"image cache {name}") as bar:
            out[name] = cached_images(images, resize, cache_dir, config.workers, progress=bar.update)
    return out


def train(config: RunConfig, reporter: Reporter | None = None) -> RunResult:
    """Train a classifier as `config` says; returns the run directory and its metrics."""
    start = time.perf_counter()
    config = config.validated()
    reporter = reporter or Reporter(config.quiet)
    runtime = Runtime.for_config(config)
    resolve_architecture(config.model, config.weights)  # a bad name fails before any data scan
    splits = resolve_splits(config.data, config.val_fraction, config.seed, config.val_data,
                            crop_to_box=config.crop_to_box, drop_empty_classes=config.drop_empty_classes,
                            quiet=config.quiet)
    train_set, val_set = splits["train"], splits["val"]
    num_classes = len(train_set.class_ids)
    reporter.info(f"data: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes")
    for name in train_set.extra.get("dropped_classes", []):
        reporter.warn(f"dropped class {name}: its folder has no images (--drop-empty-classes)")
    ignored = [entry for split in splits.values() for entry in split.ignored]
    for item, reason in ignored:
        reporter.warn(f"skipped {item}: {reason}")

    seed_everything(config.seed)
    model, report, arch = create_model(config.model, num_classes, config.weights, config.skip)
    trainable = apply_strategy(model, config.strategy, config.trainable, config.unfreeze_last)
    data_config = data_config_for(model, config.input_size, config.crop_pct)

    run_dir = new_run_dir(config.out, config.model)
    resolved = config.replace(lr=config.resolved_lr(), out=None)  # re-running makes a new run
    resolved.save(run_dir / "config.yaml")
    if report is not None:
        report.save(run_dir / "restore_report.json")
        reporter.info(report.summary())
    total = sum(p.numel() for p in model.parameters())
    trainable_count = trainable.count(model)
    reporter.info(f"model {config.model} ({arch}), strategy {config.strategy}: "
                  f"{trainable_count:,} of {total:,} parameters train; run directory {run_dir}")

    runtime.prepare(model)
    cache_dir = Path(config.cache_dir) if config.cache_dir else run_dir / "cache"
    if config.image_cache:
        splits = _with_image_cache(splits, data_config, cache_dir, config, reporter)
    log = TrainingLog(run_dir, sample_items(val_set), train_set.class_names, eval_transform(data_config))
    try:
        fitted = fit(model, trainable, splits, resolved, data_config, runtime, reporter, cache_dir, arch, log)
    finally:
        log.close()

    def forward(images):
        with runtime.autocast():
            return model(runtime.inputs(images))

    meta = {
        "warmstart_version": __version__,
        "model": config.model,
        "architecture": arch,
        "class_ids": train_set.class_ids,
        "class_names": train_set.class_names,
        "data_config": data_config,
        "strategy": config.strategy,
        "weights": config.weights,
    }
    save_model(run_dir, model, meta)  # before evaluation: a failure there loses nothing trained

    if fitted.val_logits is not None:
        evaluation = metrics_from_logits(fitted.val_logits, fitted.val_labels, train_set.class_names)
        evaluation.seconds = fitted.val_seconds
        evaluation.images_per_sec = evaluation.num_images / max(fitted.val_seconds, 1e-9)
    else:
        evaluation = evaluate_model(model, val_set, eval_transform(data_config), max(config.batch_size, 64),
                                    config.workers, runtime.device, forward)
        fitted.skipped.extend(evaluation.skipped)
    evaluation.write(run_dir)
    test_metrics = {}
    if "test" in splits:  # e.g. Stanford Dogs' official test split, where the demo reported
        tested = evaluate_model(model, splits["test"], eval_transform(data_config), max(config.batch_size, 64),
                                config.workers, runtime.device, forward)
        tested.split = "test"
        tested.write(run_dir, "test")
        fitted.skipped.extend(tested.skipped)
        test_metrics = {"test_top1": tested.top1, "test_top5": tested.top5, "test_images": tested.num_images}
        reporter.info(f"test top-1 {tested.top1:.4f}, top-5 {tested.top5:.4f} on {tested.num_images} images")
    with (run_dir / "history.json").open("w") as handle:
        json.dump(fitted.history, handle, indent=2)
    skipped = sorted(dict(ignored + fitted.skipped).items())
    if skipped:
        (run_dir / "skipped.txt").write_text("".join(f"{item}\t{reason}\n" for item, reason in skipped))

    metrics = {
        "top1": evaluation.top1,
        "top5": evaluation.top5,
        "num_classes": num_classes,
        "model": config.model,
        "architecture": arch,
        "strategy": config.strategy,
        "epochs": config.epochs,
        "train_images": len(train_set),
        "val_images": evaluation.num_images,
        "trainable_params": trainable_count,
        "total_params": total,
        "train_images_per_sec": fitted.images_processed / max(fitted.seconds, 1e-9),
        "train_seconds": fitted.seconds,  # the training phase (feature extraction of train included)
        "eval_seconds": evaluation.seconds,
        "feature_cache": fitted.used_feature_cache,
        "features_from_cache": fitted.features_from_cache,
        "precision": config.precision,
        "image_cache": config.image_cache,
        "feature_extraction_seconds": fitted.feature_seconds,
        "crop_to_box": config.crop_to_box,
        "eval_images_per_sec": evaluation.images_per_sec,
        **test_metrics,
        "skipped_images": len(skipped),
        "wall_seconds": time.perf_counter() - start,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    reporter.info(f"val top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f} on {evaluation.num_images} "
                  f"images; train {metrics['train_images_per_sec']:.1f} img/s, eval "
                  f"{metrics['eval_images_per_sec']:.1f} img/s; {metrics['wall_seconds']:.1f}s; saved {run_dir}")
    return RunResult(run_dir, metrics, evaluation, fitted.history)
