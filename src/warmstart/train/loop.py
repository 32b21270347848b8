"""The training loop: the whole model per batch, or the head alone on features computed once."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.utils.data import BatchSampler
from tqdm.auto import tqdm

from ..data.loaders import class_weights, make_loader, make_sampler
from ..data.transforms import eval_transform, train_transform
from ..evaluate import compute_outputs
from ..models.trainable import TrainableSet, only_head_trains, set_train_mode
from .schedule import make_scheduler


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_processed: int = 0
    feature_seconds: float = 0.0
    used_feature_cache: bool = False
    # validation outputs when the head was trained on features (reused for the final evaluation)
    val_logits: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    val_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)


class Reporter:
    """Progress bars, or plain log lines with --quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def info(self, message: str) -> None:
        tqdm.write(message)

    def warn(self, message: str) -> None:
        tqdm.write(f"warning: {message}")

    def bar(self, total: int, desc: str, unit: str = "img"):
        return tqdm(total=total, desc=desc, unit=unit, disable=self.quiet, leave=False, dynamic_ncols=True)


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


def pre_logits(model: torch.nn.Module):
    """The model's forward up to the classifier input (pooled features)."""
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def can_train_on_features(model, trainable: TrainableSet, config) -> bool:
    """Exact only when nothing before the head trains and training images are not augmented."""
    return (config.feature_cache and config.augment == "none" and hasattr(model, "forward_head")
            and only_head_trains(model, trainable))


def _log_skipped(reporter: Reporter, skipped, seen: dict) -> None:
    """One warning per unreadable file, however many epochs meet it."""
    for item, reason in skipped:
        if item not in seen:
            seen[item] = reason
            reporter.warn(f"skipped unreadable image {item} ({reason})")


def fit(model, trainable: TrainableSet, splits: dict, config, data_config: dict, device,
        reporter: Reporter) -> FitResult:
    if can_train_on_features(model, trainable, config):
        return _fit_head_on_features(model, splits, config, data_config, device, reporter)
    return _fit_full(model, trainable, splits["train"], config, data_config, device, reporter)


def _fit_full(model, trainable, train_set, config, data_config, device, reporter) -> FitResult:
    result = FitResult()
    loader = make_loader(train_set, train_transform(data_config, config.augment), config.batch_size,
                         shuffle=True, seed=config.seed, workers=config.workers, balance=config.balance)
    optimizer = build_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, len(loader))
    criterion = make_criterion(config, train_set.labels, len(train_set.class_ids), device)
    seen: dict = {}
    start = time.perf_counter()
    for epoch in range(config.epochs):
        set_train_mode(model, trainable)
        total_loss, correct, count = 0.0, 0, 0
        epoch_start = time.perf_counter()
        with reporter.bar(len(train_set), f"epoch {epoch + 1}/{config.epochs}") as bar:
            for batch in loader:
                _log_skipped(reporter, batch.skipped, seen)
                bar.update(len(batch.labels) + len(batch.skipped))
                if not len(batch.labels):
                    scheduler.step()
                    continue
                images, labels = batch.images.to(device), batch.labels.to(device)
                logits, loss = _step(model, images, labels, criterion, optimizer, scheduler)
                total_loss += loss * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                count += len(labels)
                rate = count / (time.perf_counter() - epoch_start)
                bar.set_postfix(loss=f"{total_loss / count:.3f}", acc=f"{correct / count:.3f}",
                                img_s=f"{rate:.1f}")
        result.images_processed += count
        result.history.append(_epoch_record(epoch, optimizer, total_loss, correct, count, epoch_start))
        reporter.info(_epoch_line(result.history[-1], config.epochs))
    result.seconds = time.perf_counter() - start
    result.skipped = sorted(seen.items())
    return result


def _fit_head_on_features(model, splits, config, data_config, device, reporter) -> FitResult:
    result = FitResult(used_feature_cache=True)
    transform = eval_transform(data_config)
    forward = pre_logits(model)
    eval_batch = max(config.batch_size, 64)
    start = time.perf_counter()
    outputs = {}
    for name in ("train", "val"):
        images = splits[name]
        with reporter.bar(len(images), f"features {name}") as bar:
            feats, labels, seconds, skipped = compute_outputs(model, images, transform, eval_batch, config.workers,
                                                              device, forward=forward, progress=bar.update)
        outputs[name] = (feats.to(device), labels.to(device), seconds)
        result.skipped.extend(skipped)
        reporter.info(f"features of {len(labels)} {name} images in {seconds:.1f}s "
                      f"({len(labels) / max(seconds, 1e-9):.1f} img/s)")
    _log_skipped(reporter, result.skipped, {})
    result.feature_seconds = outputs["train"][2]
    feats, labels, _ = outputs["train"]
    val_feats, val_labels, val_seconds = outputs["val"]

    head = model.get_classifier()
    drop_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    optimizer = build_optimizer(model, config)
    n = len(labels)
    # same sampler and generator as the image loader: the same order as training on images
    batches = BatchSampler(make_sampler(labels.tolist(), config.seed, config.balance), config.batch_size,
                           drop_last=False)
    scheduler = make_scheduler(optimizer, config, math.ceil(n / config.batch_size))
    criterion = make_criterion(config, labels.tolist(), len(splits["train"].class_ids), device)
    train_start = time.perf_counter()
    with reporter.bar(config.epochs, "training head", unit="epoch") as bar:
        for epoch in range(config.epochs):
            epoch_start = time.perf_counter()
            head.train()
            total_loss, correct = 0.0, 0
            for idx in batches:
                x, y = feats[idx], labels[idx]
                if drop_rate:
                    x = F.dropout(x, drop_rate, training=True)
                logits, loss = _step(head, x, y, criterion, optimizer, scheduler)
                total_loss += loss * len(y)
                correct += int((logits.argmax(1) == y).sum())
            head.eval()
            with torch.inference_mode():
                val_logits = head(val_feats)
            record = _epoch_record(epoch, optimizer, total_loss, correct, n, epoch_start)
            if len(val_labels):
                record["val_top1"] = float((val_logits.argmax(1) == val_labels).float().mean())
            result.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_top1']:.3f}")
            if reporter.quiet:
                reporter.info(_epoch_line(record, config.epochs))
    result.images_processed = n * config.epochs
    result.seconds = time.perf_counter() - start
    reporter.info(f"trained the head for {config.epochs} epochs in {time.perf_counter() - train_start:.1f}s "
                  f"on cached features")
    result.val_logits, result.val_labels, result.val_seconds = val_logits.cpu(), val_labels.cpu(), val_seconds
    return result


def _step(module, inputs, labels, criterion, optimizer, scheduler) -> tuple[torch.Tensor, float]:
    """One optimizer step; returns the logits and the loss."""
    logits = module(inputs)
    loss = criterion(logits, labels)
    optimizer.zero_grad(set_to_none=True)
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
