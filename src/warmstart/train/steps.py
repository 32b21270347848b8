"""What every training path shares: optimizer, loss, one step, and the records of an epoch."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from timm.optim import create_optimizer_v2

from ..data.loaders import class_weights
from .runtime import Reporter, Runtime


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
