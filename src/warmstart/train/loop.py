"""The training loop: choose the path (cached features, cached activations, or the whole model)
and train the whole model per batch, with checkpoints, exact resume and data parallelism."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV3

from ..data.feature_cache import FeatureCache
from ..data.fingerprint import fingerprint_tensors
from ..data.transforms import eval_transform
from ..errors import UserError
from ..models.segments import split_at_freeze_boundary
from ..models.trainable import TrainableSet, set_train_mode, with_frozen_norms
from ..models.tta import FlipTTA
from ..models.unfreeze import GradualUnfreezing
from .cached import (_fit_head_on_features, _fit_tail_on_activations, can_train_on_features, model_fingerprint,
                     pre_logits)
from ..stop import requested
from .checkpoint import TrainingInterrupted, rng_state, save_checkpoint, set_rng_state
from .distributed import Distributed
from .mixing import BatchMixer
from .runtime import Reporter, Runtime
from .schedule import make_scheduler
from .steps import (FitResult, _after_epoch, _epoch_line, _epoch_record, _log_skipped, _NoLog, _step,
                    build_optimizer, current_lr, make_criterion, make_training_loader)

__all__ = ["FitResult", "Reporter", "Runtime", "fit", "pre_logits", "build_optimizer"]


def fit(model, trainable: TrainableSet, splits: dict, config, data_config: dict, runtime: Runtime,
        reporter: Reporter, cache_dir: Path | None = None, arch: str = "", log=None,
        checkpoints: Path | None = None, resume: dict | None = None,
        dist: Distributed | None = None) -> FitResult:
    cache_dir = cache_dir or Path(config.cache_dir or ".")
    log = log or _NoLog()
    dist = dist or Distributed()
    if can_train_on_features(model, trainable, config):
        cache = FeatureCache(cache_dir, model_fingerprint(model, arch, runtime), reporter.warn)
        return _fit_head_on_features(model, splits, config, data_config, runtime, reporter, cache, log, dist)
    if config.cache_boundary and config.needs_image_batches:
        reporter.warn("--cache-boundary does not combine with --unfreeze-schedule, --mixup, --cutmix or "
                      "--ema-decay (they act on every image batch): training the whole model instead")
    elif config.cache_boundary and dist.active:
        reporter.warn("--cache-boundary runs in a single process only: training the whole model instead")
    elif config.cache_boundary:
        split = split_at_freeze_boundary(model, data_config["input_size"]) \
            if config.augment == "none" or config.cache_views > 1 else None
        if split is not None:
            prefix, tail = split
            key = f"{arch}|prefix={len(prefix)}|{runtime.precision}|cl={runtime.channels_last}|" \
                  f"{fingerprint_tensors(prefix.state_dict())}"
            return _fit_tail_on_activations(model, trainable, prefix, tail, splits, config, data_config, runtime,
                                            reporter, FeatureCache(cache_dir, key, reporter.warn), log)
        reporter.warn("--cache-boundary: no frozen prefix to cache here (it needs --strategy partial, "
                      "un-augmented training or --cache-views, and a known model layout); running the whole model")
    return _fit_full(model, trainable, splits["train"], config, data_config, runtime, reporter, log,
                     splits.get("val"), checkpoints, resume, dist)


def _fit_full(model, trainable, train_set, config, data_config, runtime: Runtime, reporter, log,
              val_set=None, checkpoints: Path | None = None, resume: dict | None = None,
              dist: Distributed | None = None) -> FitResult:
    """The whole model per batch. Checkpoints every epoch (and every --checkpoint-every steps);
    from a checkpoint it continues exactly: same schedule, data order, augmentation and RNG."""
    result = FitResult()
    dist = dist or Distributed()
    loader = make_training_loader(train_set, data_config, config, config.epochs, dist.rank, dist.world)
    batches = loader.batch_sampler
    unfreezing = GradualUnfreezing(config) if config.unfreeze_schedule else None
    optimizer = build_optimizer(model, config, unfreezing.final_names(model) if unfreezing else None)
    scheduler = make_scheduler(optimizer, config, batches.batches_per_epoch())
    criterion = make_criterion(config, train_set.labels, len(train_set.class_ids), runtime.device)
    mix = BatchMixer(config, len(train_set.class_ids))
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    scaler = runtime.grad_scaler()
    if dist.active and config.sync_bn:
        if runtime.device.type != "cuda":
            raise UserError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trainable = with_frozen_norms(model, trainable)  # the converted layers are new modules

    def wrap(model):
        """DDP (rebuilt when the trainable set changes: it syncs what trained when it was made) and compile."""
        forward = model
        if dist.active:
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        return torch.compile(forward) if config.compile else forward

    forward = wrap(model)
    seen: dict = {}
    step, first_epoch, first_batch, totals, best = 0, 0, 0, (0.0, 0, 0), -1.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resume["ema"])
        set_rng_state(resume["rng"])
        step, first_epoch, first_batch = resume["global_step"], resume["epoch"], resume["batch"]
        totals, best = tuple(resume["totals"]), resume["best_top1"]
        result.history = list(resume["history"])
        reporter.info(f"resuming at epoch {first_epoch + 1}, batch {first_batch} (step {step})")

    def checkpoint(epoch: int, batch: int, totals, is_best: bool = False) -> Path | None:
        if checkpoints is None:
            return None
        return save_checkpoint(checkpoints, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(),
            "epoch": epoch, "batch": batch, "global_step": step, "totals": list(totals),
            "history": result.history, "best_top1": best, "class_ids": train_set.class_ids,
            "ema": ema.module.state_dict() if ema is not None else {},
            "config": config.to_dict()}, best=is_best)

    start, val_seconds = time.perf_counter(), 0.0
    for epoch in range(first_epoch, config.epochs):
        if unfreezing is not None:
            now = unfreezing.apply(model, epoch)
            if now.trainable != trainable.trainable:
                what = unfreezing.describe(unfreezing.step_at(epoch))
                reporter.info(f"epoch {epoch + 1}: now training {what} ({now.count(model):,} parameters)")
                trainable, forward = now, wrap(model)
        set_train_mode(model, trainable)
        batch_index = first_batch if epoch == first_epoch else 0
        batches.set_epoch(epoch, batch_index)
        total_loss, correct, count = totals if epoch == first_epoch else (0.0, 0, 0)
        epoch_start = time.perf_counter()
        with reporter.bar(len(train_set), f"epoch {epoch + 1}/{config.epochs}") as bar:
            for batch in loader:
                batch_index += 1
                _log_skipped(reporter, batch.skipped, seen)
                bar.update(len(batch.labels) + len(batch.skipped))
                if len(batch.labels):
                    images, labels = runtime.inputs(batch.images), batch.labels.to(runtime.device)
                    inputs, targets = mix(images, labels)
                    logits, loss = _step(forward, inputs, targets, criterion, optimizer, scheduler, runtime, scaler)
                    if ema is not None:
                        ema.update(model, step=step)
                    log.step(step + 1, loss, current_lr(optimizer))
                    total_loss += loss * len(labels)
                    correct += int((logits.argmax(1) == labels).sum())
                    count += len(labels)
                    bar.set_postfix(loss=f"{total_loss / count:.3f}", acc=f"{correct / count:.3f}",
                                    img_s=f"{count / (time.perf_counter() - epoch_start):.1f}")
                else:
                    scheduler.step()
                step += 1
                if dist.any(requested() is not None):  # every rank stops at the same step
                    path = checkpoint(epoch, batch_index, (total_loss, correct, count))
                    raise TrainingInterrupted(requested() or signal.SIGTERM, path)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and \
                        batch_index < batches.batches_per_epoch():
                    checkpoint(epoch, batch_index, (total_loss, correct, count))
        total_loss, correct, count = dist.sum([total_loss, correct, count])  # over all ranks
        count, correct = int(count), int(correct)
        result.images_processed += count
        record = _epoch_record(epoch, optimizer, total_loss, correct, count, epoch_start)
        if val_set is not None and len(val_set) and checkpoints is not None:
            val_start = time.perf_counter()
            record["val_top1"] = _quick_top1(ema.module if ema is not None else model, val_set, data_config, config,
                                             runtime)
            val_seconds += time.perf_counter() - val_start
        result.history.append(record)
        reporter.info(_epoch_line(record, config.epochs))
        _after_epoch(log, record, model, runtime, step)
        is_best = record.get("val_top1", -1.0) > best
        best = max(best, record.get("val_top1", -1.0))
        checkpoint(epoch + 1, 0, (0.0, 0, 0), is_best)
    result.seconds = time.perf_counter() - start - val_seconds
    result.skipped = sorted(seen.items())
    if ema is not None:  # the averaged weights are the run's model
        model.load_state_dict(ema.module.state_dict())
    return result


def _quick_top1(model, val_set, data_config, config, runtime: Runtime) -> float:
    """Validation top-1 after an epoch (for the best checkpoint); restores the training mode."""
    from ..evaluate import evaluate_model

    was_training = model.training

    evaluated = FlipTTA(model) if config.tta else model

    def forward(x):
        with runtime.autocast():
            return evaluated(runtime.inputs(x))

    top1 = evaluate_model(model, val_set, eval_transform(data_config), max(config.batch_size, 64), config.workers,
                          runtime.device, forward).top1
    model.train(was_training)
    return top1
