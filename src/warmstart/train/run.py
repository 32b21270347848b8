"""One training run, end to end: data, model, weights, strategy, loop, artifacts, evaluation."""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
from ..models.tta import FlipTTA
from ..errors import UserError
from ..run_dir import MODEL_FILE, RunLock, new_run_dir, save_model
from ..stop import StopRequest, Stopped
from .checkpoint import TrainingInterrupted, load_checkpoint
from .distributed import Distributed, init_distributed, shutdown
from .history import TrainingLog
from .loop import Reporter, Runtime, fit


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    evaluation: EvalResult
    history: list[dict]


def _rate(images_per_sec: float | None) -> str:
    return "features from the cache" if images_per_sec is None else f"{images_per_sec:.1f} img/s"


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


# settings that may differ when a run is resumed: they do not change what is computed
RESUMABLE_CHANGES = {"quiet", "workers", "out", "cache_dir", "checkpoint_every"}


def _resume_state(run_dir: Path, config: RunConfig, reporter: Reporter, weights_only: bool) -> dict:
    """The checkpoint to continue from, refusing a changed config that would break exactness."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    if (run_dir / MODEL_FILE).exists() and not weights_only:
        raise UserError(f"--resume {run_dir}: this run already finished; use --resume-weights-only to start a new "
                        f"run from its weights")
    state = load_checkpoint(run_dir / "checkpoints", warn=reporter.warn)
    if state is None:
        raise UserError(f"--resume {run_dir}: no readable checkpoint in {run_dir / 'checkpoints'}; "
                        f"checkpoints are written when the whole model trains (not on cached features)")
    saved = state["config"]
    current = config.replace(lr=config.resolved_lr(), out=None).to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and current[k] != saved.get(k))
    if changed and not weights_only:
        raise UserError(f"--resume {run_dir}: the config differs in {', '.join(changed)}, so the run could not "
                        f"continue exactly; drop those flags, or pass --resume-weights-only to start a new run "
                        f"from the checkpoint's weights")
    return state


def train(config: RunConfig, reporter: Reporter | None = None, resume: str | Path | None = None,
          resume_weights_only: bool = False, on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Train a classifier as `config` says; returns the run directory and its metrics.
    `resume`: a run directory whose latest checkpoint to continue exactly (or, with
    `resume_weights_only`, whose weights start a new run). `on_epoch(record)` sees each epoch's
    record (with `val_top1` where validated) and may raise to stop the run (e.g. a pruned trial)."""
    config = config.validated()
    dist = init_distributed()
    try:
        return _train(config, dist, reporter or Reporter(config.quiet, silent=not dist.is_main), resume,
                      resume_weights_only, on_epoch)
    finally:
        shutdown(dist)


def _evaluate(model, images, data_config, config, runtime, forward, dist: Distributed):
    """Evaluation, each rank on every world-th image, gathered: the same result on every rank."""
    if not dist.active:
        return evaluate_model(model, images, eval_transform(data_config), max(config.batch_size, 64), config.workers,
                              runtime.device, forward)
    from ..evaluate import compute_outputs

    shard = images.subset(range(dist.rank, len(images), dist.world))
    out = compute_outputs(model, shard, eval_transform(data_config), max(config.batch_size, 64), config.workers,
                          runtime.device, forward=forward)
    parts = dist.gather((out.outputs, out.labels, out.seconds, out.skipped))
    evaluation = metrics_from_logits(torch.cat([p[0] for p in parts if len(p[1])]) if any(len(p[1]) for p in parts)
                                     else torch.empty(0), torch.cat([p[1] for p in parts]), images.class_names)
    evaluation.seconds = max(p[2] for p in parts)
    evaluation.images_per_sec = evaluation.num_images / max(evaluation.seconds, 1e-9)
    evaluation.skipped = [s for p in parts for s in p[3]]
    return evaluation


class _EpochHook:
    """The training log, plus the caller's per-epoch callback."""

    def __init__(self, log, on_epoch):
        self.log, self.on_epoch = log, on_epoch

    def step(self, *args):
        if self.log is not None:
            self.log.step(*args)

    def epoch(self, record: dict):
        if self.log is not None:
            self.log.epoch(record)
        self.on_epoch(record)

    def predictions(self, *args):
        if self.log is not None:
            self.log.predictions(*args)


@dataclass
class Built:
    """What a run starts from: its data splits, and the model with its weights and trainable set."""
    splits: dict
    ignored: list
    model: torch.nn.Module
    report: object
    arch: str
    trainable: object
    data_config: dict


def build(config: RunConfig, reporter: Reporter) -> Built:
    """Scan the data, create the model, restore its weights and choose what trains (train, lr-find)."""
    resolve_architecture(config.model, config.weights)  # a bad name fails before any data scan
    splits = resolve_splits(config.data, config.val_fraction, config.seed, config.val_data,
                            crop_to_box=config.crop_to_box, drop_empty_classes=config.drop_empty_classes,
                            quiet=config.quiet, allow_outside_paths=config.allow_outside_paths)
    train_set, val_set = splits["train"], splits["val"]
    reporter.info(f"data: {len(train_set)} train / {len(val_set)} val images, {len(train_set.class_ids)} classes")
    for name in train_set.extra.get("dropped_classes", []):
        reporter.warn(f"dropped class {name}: its folder has no images (--drop-empty-classes)")
    ignored = [entry for split in splits.values() for entry in split.ignored]
    for item, reason in ignored:
        reporter.warn(f"skipped {item}: {reason}")
    seed_everything(config.seed)
    model, report, arch = create_model(config.model, len(train_set.class_ids), config.weights, config.skip)
    trainable = apply_strategy(model, config.strategy, config.trainable, config.unfreeze_last)
    data_config = data_config_for(model, config.input_size, config.crop_pct, config.input_scale)
    return Built(splits, ignored, model, report, arch, trainable, data_config)


def _train(config: RunConfig, dist: Distributed, reporter: Reporter, resume, resume_weights_only,
           on_epoch=None) -> RunResult:
    start = time.perf_counter()
    built = build(config, reporter)
    resume_state = None
    if resume is not None:
        resume_state = _resume_state(Path(resume), config, reporter, resume_weights_only)
        if [*resume_state["class_ids"]] != built.splits["train"].class_ids:
            raise UserError(f"--resume {resume}: the data's classes differ from the checkpoint's")
    if resume_state is not None and not resume_weights_only:
        run_dir = Path(resume)
    else:  # rank 0 makes the run directory; the others learn its name
        run_dir = Path(dist.broadcast(str(new_run_dir(config.out, config.model)) if dist.is_main else None))
    # rank 0 holds the run directory's lock: a second run with the same --out stops at once
    with RunLock(run_dir) if dist.is_main else contextlib.nullcontext(), StopRequest():
        if resume_state is not None and resume_weights_only:
            built.model.load_state_dict(resume_state["model"])
            reporter.info(f"starting from the weights of {resume} (a new schedule)")
            resume_state = None
        try:
            return _train_in(run_dir, config, built, dist, reporter, resume_state, on_epoch, start)
        except TrainingInterrupted:
            raise
        except Stopped as stop:
            raise Stopped(stop.signum, _what_is_kept(run_dir, config)) from None


def _what_is_kept(run_dir: Path, config: RunConfig) -> str:
    if (run_dir / MODEL_FILE).exists():
        return f"the trained model is saved in {run_dir}; evaluate it with: warmstart eval {run_dir}"
    cache = config.cache_dir or run_dir / "cache"
    return (f"what was computed is kept (feature cache in {cache}); continue with the same command and "
            f"--out {run_dir}")


def _train_in(run_dir: Path, config: RunConfig, built: Built, dist: Distributed, reporter: Reporter,
              resume_state: dict | None, on_epoch, start: float) -> RunResult:
    runtime = Runtime.for_config(config, dist.local_rank)
    splits, model, report, arch, trainable, data_config = (built.splits, built.model, built.report, built.arch,
                                                           built.trainable, built.data_config)
    train_set, val_set, ignored = splits["train"], splits["val"], built.ignored
    num_classes = len(train_set.class_ids)
    main = dist.is_main  # only rank 0 writes in the run directory
    resolved = config.replace(lr=config.resolved_lr(), out=None)  # re-running makes a new run
    if main:
        resolved.save(run_dir / "config.yaml")
    if report is not None:
        if main:
            report.save(run_dir / "restore_report.json")
        reporter.info(report.summary())
    if dist.active:
        reporter.info(f"distributed: {dist.world} processes, batch {config.batch_size} per process "
                      f"({config.batch_size * dist.world} per step)")
    total = sum(p.numel() for p in model.parameters())
    trainable_count = trainable.count(model)
    reporter.info(f"model {config.model} ({arch}), strategy {config.strategy}: "
                  f"{trainable_count:,} of {total:,} parameters train; run directory {run_dir}")

    runtime.prepare(model)
    cache_dir = Path(config.cache_dir) if config.cache_dir else run_dir / "cache"
    if config.image_cache:
        splits = _with_image_cache(splits, data_config, cache_dir, config, reporter)
    log = TrainingLog(run_dir, sample_items(val_set), train_set.class_names, eval_transform(data_config),
                      append=resume_state is not None, epochs=config.epochs) if main else None
    try:
        fitted = fit(model, trainable, splits, resolved, data_config, runtime, reporter, cache_dir, arch,
                     _EpochHook(log, on_epoch) if on_epoch is not None else log,
                     run_dir / "checkpoints" if main else None, resume_state, dist)
    finally:
        if log is not None:
            log.close()

    evaluated = FlipTTA(model) if config.tta else model

    def forward(images):
        with runtime.autocast():
            return evaluated(runtime.inputs(images))

    meta = {
        "warmstart_version": __version__,
        "model": config.model,
        "architecture": arch,
        "class_ids": train_set.class_ids,
        "class_names": train_set.class_names,
        "data_config": data_config,
        "strategy": config.strategy,
        "weights": config.weights,
        "recipe": config.recipe,
        "tta": config.tta,  # prediction, serving and export average the image and its mirror image
    }
    if main:
        save_model(run_dir, model, meta)  # before evaluation: a failure there loses nothing trained

    if fitted.val_logits is not None:
        evaluation = metrics_from_logits(fitted.val_logits, fitted.val_labels, train_set.class_names)
        evaluation.seconds = fitted.val_seconds
        # validation features read back from the cache: nothing was computed, no rate to report
        evaluation.images_per_sec = evaluation.num_images / fitted.val_seconds if fitted.val_seconds > 0.01 else None
    else:
        evaluation = _evaluate(model, val_set, data_config, config, runtime, forward, dist)
        fitted.skipped.extend(evaluation.skipped)
    if main:
        evaluation.write(run_dir)
    test_metrics = {}
    if "test" in splits:  # e.g. Stanford Dogs' official test split, where the demo reported
        tested = _evaluate(model, splits["test"], data_config, config, runtime, forward, dist)
        tested.split = "test"
        if main:
            tested.write(run_dir, "test")
        fitted.skipped.extend(tested.skipped)
        test_metrics = {"test_top1": tested.top1, "test_top5": tested.top5, "test_images": tested.num_images}
        reporter.info(f"test top-1 {tested.top1:.4f}, top-5 {tested.top5:.4f} on {tested.num_images} images")
    skipped = sorted(dict(ignored + fitted.skipped).items())
    if main:
        with (run_dir / "history.json").open("w") as handle:
            json.dump(fitted.history, handle, indent=2)
    if skipped and main:
        (run_dir / "skipped.txt").write_text("".join(f"{item}\t{reason}\n" for item, reason in skipped))

    metrics = {
        "top1": evaluation.top1,
        "top5": evaluation.top5,
        "num_classes": num_classes,
        "model": config.model,
        "architecture": arch,
        "strategy": config.strategy,
        "recipe": config.recipe,
        "tta": config.tta,
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
        "processes": dist.world,
        "wall_seconds": time.perf_counter() - start,
    }
    if main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    reporter.info(f"val top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f} on {evaluation.num_images} "
                  f"images; train {metrics['train_images_per_sec']:.1f} img/s, eval "
                  f"{_rate(metrics['eval_images_per_sec'])}; {metrics['wall_seconds']:.1f}s; saved {run_dir}")
    return RunResult(run_dir, metrics, evaluation, fitted.history)
