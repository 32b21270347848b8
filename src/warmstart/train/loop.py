"""The training loop: the whole model per batch, or the head alone on cached features."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from ..data.feature_cache import CachedFeatures, FeatureCache
from ..data.fingerprint import fingerprint_tensors
from ..data.loaders import EpochBatches, class_weights, make_loader, seeded_generator
from ..data.transforms import eval_transform, train_transform
from ..errors import UserError
from ..models.trainable import TrainableSet, only_head_trains, set_train_mode
from ..models.segments import split_at_freeze_boundary
from ..models.weights import classifier_names
from .distributed import Distributed
from .checkpoint import StopRequest, TrainingInterrupted, rng_state, save_checkpoint, set_rng_state
from .schedule import make_scheduler


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_processed: int = 0
    feature_seconds: float = 0.0
    used_feature_cache: bool = False
    features_from_cache: bool = False
    # validation outputs when the head was trained on features (reused for the final evaluation)
    val_logits: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    val_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)


class Reporter:
    """Progress bars, or plain log lines with --quiet."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent  # ranks other than 0 of a distributed run say nothing

    def info(self, message: str) -> None:
        if not self.silent:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        if not self.silent:
            tqdm.write(f"warning: {message}")

    def bar(self, total: int, desc: str, unit: str = "img"):
        return tqdm(total=total, desc=desc, unit=unit, disable=self.quiet, leave=False, dynamic_ncols=True)


@dataclass
class Runtime:
    """Where and how tensors are computed: device, precision, memory format, compilation."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True

    @classmethod
    def for_config(cls, config, local_rank: int = 0) -> "Runtime":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if config.precision == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a GPU: use --precision bf16 on the CPU")
        return cls(device, config.precision, config.channels_last)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.ndim == 4 \
            else images

    def grad_scaler(self):
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    """SGD with (plain) momentum or AdamW over the trainable parameters; no decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = "momentum" if config.optimizer == "sgd" else "adamw"
    kwargs = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return create_optimizer_v2([g for g in groups if g["params"]], opt=opt, lr=config.resolved_lr(), **kwargs)


def make_criterion(config, labels, num_classes: int, device) -> torch.nn.Module:
    weight = class_weights(labels, num_classes).to(device) if config.balance == "loss" else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def pre_logits(model: torch.nn.Module, runtime: Runtime | None = None):
    """The model's forward up to the classifier input (pooled features)."""
    runtime = runtime or Runtime(torch.device("cpu"), "fp32", False)

    def forward(x):
        with runtime.autocast():
            return model.forward_head(model.forward_features(runtime.inputs(x)), pre_logits=True)

    return forward


def can_train_on_features(model, trainable: TrainableSet, config) -> bool:
    """Exact when nothing before the head trains and the training views are fixed: un-augmented,
    or K stored augmented views (--cache-views K)."""
    return (config.feature_cache and hasattr(model, "forward_head") and only_head_trains(model, trainable)
            and (config.augment == "none" or config.cache_views > 1))


def model_fingerprint(model: torch.nn.Module, arch: str, runtime: Runtime) -> str:
    """What the features depend on: the frozen weights' values and how they are computed."""
    head = set(classifier_names(model))
    frozen = {k: v for k, v in model.state_dict().items() if k not in head}
    return f"{arch}|{runtime.precision}|cl={runtime.channels_last}|{fingerprint_tensors(frozen)}"


def _log_skipped(reporter: Reporter, skipped, seen: dict) -> None:
    """One warning per unreadable file, however many epochs meet it."""
    for item, reason in skipped:
        if item not in seen:
            seen[item] = reason
            reporter.warn(f"skipped unreadable image {item} ({reason})")


class _NoLog:
    def step(self, *args):
        pass

    def epoch(self, *args):
        pass

    def predictions(self, *args):
        pass


def _after_epoch(log, record: dict, model, runtime: Runtime, step: int) -> None:
    log.epoch(record)
    was_training = model.training
    model.eval()

    def forward(x):
        with runtime.autocast():
            return model(runtime.inputs(x))

    log.predictions(record["epoch"], forward)
    model.train(was_training)


def fit(model, trainable: TrainableSet, splits: dict, config, data_config: dict, runtime: Runtime,
        reporter: Reporter, cache_dir: Path | None = None, arch: str = "", log=None,
        checkpoints: Path | None = None, resume: dict | None = None, stop=None,
        dist: Distributed | None = None) -> FitResult:
    cache_dir = cache_dir or Path(config.cache_dir or ".")
    log = log or _NoLog()
    dist = dist or Distributed()
    if can_train_on_features(model, trainable, config):
        cache = FeatureCache(cache_dir, model_fingerprint(model, arch, runtime))
        return _fit_head_on_features(model, splits, config, data_config, runtime, reporter, cache, log, dist)
    if config.cache_boundary and dist.active:
        reporter.warn("--cache-boundary runs in a single process only: training the whole model instead")
    elif config.cache_boundary:
        split = split_at_freeze_boundary(model, data_config["input_size"]) \
            if config.augment == "none" or config.cache_views > 1 else None
        if split is not None:
            prefix, tail = split
            key = f"{arch}|prefix={len(prefix)}|{runtime.precision}|cl={runtime.channels_last}|" \
                  f"{fingerprint_tensors(prefix.state_dict())}"
            return _fit_tail_on_activations(model, trainable, prefix, tail, splits, config, data_config, runtime,
                                            reporter, FeatureCache(cache_dir, key), log)
        reporter.warn("--cache-boundary: no frozen prefix to cache here (it needs --strategy partial, "
                      "un-augmented training or --cache-views, and a known model layout); running the whole model")
    return _fit_full(model, trainable, splits["train"], config, data_config, runtime, reporter, log,
                     splits.get("val"), checkpoints, resume, stop, dist)


def _fit_full(model, trainable, train_set, config, data_config, runtime: Runtime, reporter, log,
              val_set=None, checkpoints: Path | None = None, resume: dict | None = None,
              stop: StopRequest | None = None, dist: Distributed | None = None) -> FitResult:
    """The whole model per batch. Checkpoints every epoch (and every --checkpoint-every steps);
    from a checkpoint it continues exactly: same schedule, data order, augmentation and RNG."""
    result = FitResult()
    dist = dist or Distributed()
    loader = make_loader(train_set, train_transform(data_config, config.augment), config.batch_size,
                         shuffle=True, seed=config.seed, workers=config.workers, balance=config.balance,
                         epochs=config.epochs, rank=dist.rank, world=dist.world)
    batches = loader.batch_sampler
    optimizer = build_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, batches.batches_per_epoch())
    criterion = make_criterion(config, train_set.labels, len(train_set.class_ids), runtime.device)
    scaler = runtime.grad_scaler()
    forward = model
    if dist.active:
        if config.sync_bn:
            if runtime.device.type != "cuda":
                raise UserError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU)")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    forward = torch.compile(forward) if config.compile else forward
    seen: dict = {}
    step, first_epoch, first_batch, totals, best = 0, 0, 0, (0.0, 0, 0), -1.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
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
            "config": config.to_dict()}, best=is_best)

    start, val_seconds = time.perf_counter(), 0.0
    for epoch in range(first_epoch, config.epochs):
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
                    logits, loss = _step(forward, images, labels, criterion, optimizer, scheduler, runtime, scaler)
                    log.step(step + 1, loss, optimizer.param_groups[0]["lr"])
                    total_loss += loss * len(labels)
                    correct += int((logits.argmax(1) == labels).sum())
                    count += len(labels)
                    bar.set_postfix(loss=f"{total_loss / count:.3f}", acc=f"{correct / count:.3f}",
                                    img_s=f"{count / (time.perf_counter() - epoch_start):.1f}")
                else:
                    scheduler.step()
                step += 1
                stopping = stop is not None and stop.signum is not None
                if dist.any(stopping):  # every rank stops at the same step
                    path = checkpoint(epoch, batch_index, (total_loss, correct, count))
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, path)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and \
                        batch_index < batches.batches_per_epoch():
                    checkpoint(epoch, batch_index, (total_loss, correct, count))
        total_loss, correct, count = dist.sum([total_loss, correct, count])  # over all ranks
        count, correct = int(count), int(correct)
        result.images_processed += count
        record = _epoch_record(epoch, optimizer, total_loss, correct, count, epoch_start)
        if val_set is not None and len(val_set) and checkpoints is not None:
            val_start = time.perf_counter()
            record["val_top1"] = _quick_top1(model, val_set, data_config, config, runtime)
            val_seconds += time.perf_counter() - val_start
        result.history.append(record)
        reporter.info(_epoch_line(record, config.epochs))
        _after_epoch(log, record, model, runtime, step)
        is_best = record.get("val_top1", -1.0) > best
        best = max(best, record.get("val_top1", -1.0))
        checkpoint(epoch + 1, 0, (0.0, 0, 0), is_best)
    result.seconds = time.perf_counter() - start - val_seconds
    result.skipped = sorted(seen.items())
    return result


def _quick_top1(model, val_set, data_config, config, runtime: Runtime) -> float:
    """Validation top-1 after an epoch (for the best checkpoint); restores the training mode."""
    from ..evaluate import evaluate_model

    was_training = model.training

    def forward(x):
        with runtime.autocast():
            return model(runtime.inputs(x))

    top1 = evaluate_model(model, val_set, eval_transform(data_config), max(config.batch_size, 64), config.workers,
                          runtime.device, forward).top1
    model.train(was_training)
    return top1


def _cached(cache: FeatureCache, name: str, images, transform, forward, config, runtime, reporter,
            view: int = 0, item_seed: int | None = None, dist: Distributed | None = None) -> CachedFeatures:
    if dist is not None and dist.active:
        return _cached_sharded(cache, name, images, transform, forward, config, runtime, reporter, view, item_seed,
                               dist)
    label = name if view == 0 else f"{name} view {view}"
    with reporter.bar(len(images), f"features {label}") as bar:
        out = cache.features(name, images, transform, forward, max(config.batch_size, 64), config.workers,
                             runtime.device, view, item_seed, progress=bar.update)
    if out.computed:
        reporter.info(f"features of {out.computed} {label} images in {out.seconds:.1f}s "
                      f"({out.computed / max(out.seconds, 1e-9):.1f} img/s)")
    else:
        reporter.info(f"features of {len(images)} {label} images from the cache")
    return out


def _cached_sharded(cache, name, images, transform, forward, config, runtime, reporter, view, item_seed,
                    dist: Distributed) -> CachedFeatures:
    """Each rank extracts every world-th image into its own shard; then every rank reads all shards."""
    def shard(rank: int):
        return images.subset(range(rank, len(images), dist.world)), f"{name}-shard{rank}of{dist.world}"

    subset, shard_name = shard(dist.rank)
    own = _cached(cache, shard_name, subset, transform, forward, config, runtime, reporter, view, item_seed)
    dist.barrier()
    parts = [own if r == dist.rank else cache.features(shard(r)[1], shard(r)[0], transform, forward,
                                                       config.batch_size, 0, runtime.device, view, item_seed)
             for r in range(dist.world)]
    n = len(images)
    first = next((p.features for p in parts if p.features.numel()), torch.zeros(0, 0))
    features = torch.zeros(n, *first.shape[1:])
    valid = torch.zeros(n, dtype=torch.bool)
    for r, part in enumerate(parts):
        if part.features.numel():
            features[r::dist.world] = part.features
        valid[r::dist.world] = part.valid
    seconds = max(dist.gather(own.seconds))
    return CachedFeatures(features, valid, torch.as_tensor(images.labels, dtype=torch.long), seconds,
                          sum(p.computed for p in parts), [s for p in parts for s in p.skipped])


def _cached_training_views(cache, train_set, forward, config, data_config, runtime, reporter,
                           name: str = "train", dist: Distributed | None = None) -> list[CachedFeatures]:
    """View 0 un-augmented, then K-1 augmented views (--cache-views K with --augment standard)."""
    views = [_cached(cache, name, train_set, eval_transform(data_config), forward, config, runtime, reporter,
                     dist=dist)]
    augmented = train_transform(data_config, "standard")
    for view in range(1, config.cache_views if config.augment != "none" else 1):
        views.append(_cached(cache, name, train_set, augmented, forward, config, runtime, reporter,
                             view=view, item_seed=config.seed * 1000 + view, dist=dist))
    return views


def _cached_training_plan(model, config, labels: torch.Tensor, num_classes: int, device):
    """Optimizer, batches, view chooser, schedule and loss for training on cached inputs. The
    batches come from the same sampler and generator as the image loader: the same order."""
    optimizer = build_optimizer(model, config)
    batches = EpochBatches(labels.tolist(), config.batch_size, config.seed, config.balance)
    scheduler = make_scheduler(optimizer, config, batches.batches_per_epoch())
    criterion = make_criterion(config, labels.tolist(), num_classes, device)
    return optimizer, batches, seeded_generator(config.seed + 7), scheduler, criterion


def _fit_tail_on_activations(model, trainable, prefix, tail, splits, config, data_config, runtime: Runtime,
                             reporter, cache: FeatureCache, log) -> FitResult:
    """The frozen prefix runs once per image (and view); each epoch runs only the trainable tail."""
    result = FitResult(used_feature_cache=True)
    model.eval()

    def run_prefix(x):
        with runtime.autocast():
            return prefix(runtime.inputs(x))

    start = time.perf_counter()
    train_set = splits["train"]
    views = _cached_training_views(cache, train_set, run_prefix, config, data_config, runtime, reporter,
                                   "train-boundary")
    result.feature_seconds = sum(v.seconds for v in views)
    result.features_from_cache = not any(v.computed for v in views)
    val = _cached(cache, "val-boundary", splits["val"], eval_transform(data_config), run_prefix, config, runtime,
                  reporter)
    result.skipped = sorted(dict([s for v in views for s in v.skipped] + val.skipped).items())
    _log_skipped(reporter, result.skipped, {})
    rows = torch.nonzero(torch.stack([v.valid for v in views]).all(0)).flatten()
    labels = views[0].labels[rows]
    n = len(rows)

    def run_tail(x):
        return model.forward_head(tail(x))

    optimizer, batches, view_choice, scheduler, criterion = _cached_training_plan(
        model, config, labels, len(train_set.class_ids), runtime.device)
    scaler, step = runtime.grad_scaler(), 0
    for epoch in range(config.epochs):
        set_train_mode(model, trainable)
        total_loss, correct, count = 0.0, 0, 0
        epoch_start = time.perf_counter()
        with reporter.bar(n, f"epoch {epoch + 1}/{config.epochs} (tail)") as bar:
            batches.set_epoch(epoch)
            for keys in batches:
                idx = torch.as_tensor([i for _, i in keys])
                view = torch.randint(len(views), (len(idx),), generator=view_choice) if len(views) > 1 else None
                source = rows[idx]
                x = torch.stack([views[int(v)].features[r] for v, r in zip(view, source)]) if view is not None \
                    else views[0].features[source]
                y = labels[idx].to(runtime.device)
                logits, loss = _step(run_tail, runtime.inputs(x), y, criterion, optimizer, scheduler, runtime,
                                     scaler)
                step += 1
                log.step(step, loss, optimizer.param_groups[0]["lr"])
                total_loss += loss * len(y)
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
                bar.update(len(y))
        result.history.append(_epoch_record(epoch, optimizer, total_loss, correct, count, epoch_start))
        reporter.info(_epoch_line(result.history[-1], config.epochs))
        _after_epoch(log, result.history[-1], model, runtime, step)
    result.images_processed = n * config.epochs
    result.seconds = time.perf_counter() - start - val.seconds
    model.eval()
    eval_start = time.perf_counter()
    val_rows = torch.nonzero(val.valid).flatten()
    with torch.inference_mode():
        val_logits = torch.cat([run_tail(runtime.inputs(val.features[val_rows[i:i + 64]])).float().cpu()
                                for i in range(0, len(val_rows), 64)]) if len(val_rows) else torch.empty(0)
    result.val_logits, result.val_labels = val_logits, val.labels[val_rows]
    result.val_seconds = val.seconds + time.perf_counter() - eval_start
    return result


def _fit_head_on_features(model, splits, config, data_config, runtime: Runtime, reporter,
                          cache: FeatureCache, log, dist: Distributed | None = None) -> FitResult:
    """Every rank trains the same head on the same (sharded, then shared) features: deterministic,
    so rank 0's head is everyone's."""
    result = FitResult(used_feature_cache=True)
    model.eval()
    forward = pre_logits(torch.compile(model) if config.compile else model, runtime)
    start = time.perf_counter()
    train_set = splits["train"]
    views = _cached_training_views(cache, train_set, forward, config, data_config, runtime, reporter, dist=dist)
    result.feature_seconds = sum(v.seconds for v in views)
    result.features_from_cache = not any(v.computed for v in views)
    val = _cached(cache, "val", splits["val"], eval_transform(data_config), forward, config, runtime, reporter,
                  dist=dist)
    result.skipped = sorted(dict([s for v in views for s in v.skipped] + val.skipped).items())
    _log_skipped(reporter, result.skipped, {})

    valid = torch.stack([v.valid for v in views]).all(0)
    rows = torch.nonzero(valid).flatten()
    feats = torch.stack([v.features[rows] for v in views]).to(runtime.device)  # [views, n, dim]
    labels = views[0].labels[rows].to(runtime.device)
    val_rows = torch.nonzero(val.valid).flatten()
    val_feats, val_labels = val.features[val_rows].to(runtime.device), val.labels[val_rows].to(runtime.device)

    head = model.get_classifier()
    drop_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    n = len(labels)
    optimizer, batches, view_choice, scheduler, criterion = _cached_training_plan(
        model, config, labels, len(train_set.class_ids), runtime.device)
    train_start, step = time.perf_counter(), 0
    with reporter.bar(config.epochs, "training head", unit="epoch") as bar:
        for epoch in range(config.epochs):
            epoch_start = time.perf_counter()
            head.train()
            total_loss, correct = 0.0, 0
            batches.set_epoch(epoch)
            for keys in batches:
                idx = torch.as_tensor([i for _, i in keys])
                view = torch.randint(len(views), (len(idx),), generator=view_choice) if len(views) > 1 else 0
                x, y = feats[view, idx], labels[idx]
                if drop_rate:
                    x = F.dropout(x, drop_rate, training=True)
                logits, loss = _step(head, x, y, criterion, optimizer, scheduler)
                step += 1
                log.step(step, loss, optimizer.param_groups[0]["lr"])
                total_loss += loss * len(y)
                correct += int((logits.argmax(1) == y).sum())
            head.eval()
            with torch.inference_mode():
                val_logits = head(val_feats)
            record = _epoch_record(epoch, optimizer, total_loss, correct, n, epoch_start)
            if len(val_labels):
                record["val_top1"] = float((val_logits.argmax(1) == val_labels).float().mean())
            result.history.append(record)
            _after_epoch(log, record, model, runtime, step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_top1']:.3f}")
            if reporter.quiet:
                reporter.info(_epoch_line(record, config.epochs))
    result.images_processed = n * config.epochs
    result.seconds = time.perf_counter() - start - val.seconds  # validation features belong to evaluation
    reporter.info(f"trained the head for {config.epochs} epochs in {time.perf_counter() - train_start:.1f}s "
                  f"on cached features ({len(views)} view{'s' if len(views) > 1 else ''})")
    result.val_logits, result.val_labels, result.val_seconds = val_logits.cpu(), val_labels.cpu(), val.seconds
    return result


def _step(module, inputs, labels, criterion, optimizer, scheduler, runtime: Runtime | None = None,
          scaler=None) -> tuple[torch.Tensor, float]:
    """One optimizer step; returns the logits and the loss."""
    with runtime.autocast() if runtime else contextlib.nullcontext():
        logits = module(inputs)
        loss = criterion(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()
    return logits.detach(), loss.item()


def _epoch_record(epoch, optimizer, total_loss, correct, count, epoch_start) -> dict:
    seconds = time.perf_counter() - epoch_start
    return {
        "epoch": epoch + 1,
        "train_loss": total_loss / max(count, 1),
        "train_top1": correct / max(count, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_sec": count / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _epoch_line(record: dict, epochs: int) -> str:
    line = (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}, "
            f"train top-1 {record['train_top1']:.4f}, {record['images_per_sec']:.1f} img/s")
    if "val_top1" in record:
        line += f", val top-1 {record['val_top1']:.4f}"
    return line
