"""What every training path shares: optimizer, loss, one step, and the records of an epoch."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

from ..data.loaders import class_weights
from ..errors import UserError
from ..models.weights import classifier_names
from ..compute.runtime import Runtime
from ..progress import Reporter


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_processed: int = 0
    feature_seconds: float = 0.0  # extracting the training views' features (cached paths)
    images_extracted: int = 0  # how many of them were computed (not read from the cache)
    used_feature_cache: bool = False
    features_from_cache: bool = False
    # validation outputs when the head was trained on features (reused for the final evaluation)
    val_logits: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    val_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    path: str = ""  # the training path taken (train.paths), as the run reports it
    best_epoch: int | None = None  # the epoch whose weights were kept (0: the start; None: the last)
    start_top1: float | None = None  # val top-1 of the weights training started from, where measured
    head_seconds: float = 0.0  # on cached features: the head's training alone (extraction excluded)
    # --calibration-fit cross-fit: every train and val photo's out-of-fold logits (train/cross_fit.py)
    cross_fit_logits: torch.Tensor | None = None
    cross_fit_labels: torch.Tensor | None = None

    def took(self, driven) -> None:
        """What the epoch driver (train.driver.drive) recorded: history, kept epoch, the start's score."""
        self.history, self.best_epoch, self.start_top1 = driven.history, driven.best_epoch, driven.start_top1


def layer_scales(model: torch.nn.Module, layer_decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay (BEiT, timm): the top layer x1, each layer below x layer_decay
    more, with layers as the model's fine-grained timm groups (stem, then each block, then the head)."""
    if not hasattr(model, "group_matcher"):
        raise UserError(f"--layer-decay: {type(model).__name__} has no layer structure in timm; drop --layer-decay")
    layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layers.values())
    return {name: layer_decay ** (top - layers.get(name, top)) for name, _ in model.named_parameters()}


def parameter_groups(model: torch.nn.Module, config, names: list[str] | None = None,
                     head_decay: bool = True) -> list[dict]:
    """Optimizer groups over `names` (default: what trains now): each its own learning rate
    (layer decay, the head's rate) and weight decay (none on biases and norms; none on the head
    without `head_decay`: its anchor's penalty regularises it)."""
    names = set(names) if names is not None else {n for n, p in model.named_parameters() if p.requires_grad}
    lr = config.resolved_lr()
    head = set(classifier_names(model))
    scales = layer_scales(model, config.layer_decay) if config.layer_decay else {}
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if name not in names:
            continue
        decay = config.weight_decay if param.ndim > 1 and (head_decay or name not in head) else 0.0
        rate = (config.head_lr or lr) if name in head else lr * scales.get(name, 1.0)
        key = (name in head, rate, decay)
        group = groups.setdefault(key, {"params": [], "param_names": [], "lr": rate, "weight_decay": decay})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, config, names: list[str] | None = None,
                    head_decay: bool = True) -> torch.optim.Optimizer:
    """SGD with (plain) momentum or AdamW over the trainable parameters (or `names`, for gradual
    unfreezing: parameters still frozen get no gradient, so the optimizer leaves them alone)."""
    opt = "momentum" if config.optimizer == "sgd" else "adamw"
    kwargs = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    return create_optimizer_v2(parameter_groups(model, config, names, head_decay), opt=opt, lr=config.resolved_lr(), **kwargs)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The highest group's rate (with layer decay the groups differ; the head's or top layer's)."""
    return max(group["lr"] for group in optimizer.param_groups)


def make_criterion(config, labels, num_classes: int, device) -> torch.nn.Module:
    weight = class_weights(labels, num_classes).to(device) if config.balance == "loss" else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def log_skipped(reporter: Reporter, skipped, seen: dict) -> None:
    """One warning per unreadable file, however many epochs meet it."""
    for item, reason in skipped:
        if item not in seen:
            seen[item] = reason
            reporter.warn(f"skipped unreadable image {item} ({reason})")


def after_epoch(log, record: dict, model, runtime: Runtime) -> None:
    """The epoch's record to the log, with a grid of sample predictions (when the log draws one)."""
    log.epoch(record)
    was_training = model.training
    model.eval()
    log.predictions(record["epoch"], runtime.forward(model))
    model.train(was_training)


def train_step(module, inputs, labels, criterion, optimizer, scheduler, runtime: Runtime | None = None,
               scaler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the logits and the loss (detached tensors: no wait for the device)."""
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
    if scheduler is not None:
        scheduler.step()
    return logits.detach(), loss.detach()


def epoch_record(epoch: int, optimizer, totals, epoch_start: float) -> dict:
    """What an epoch did (`totals`: its Totals, or summed (loss, correct, count) numbers)."""
    total_loss, correct, count = totals.values() if hasattr(totals, "values") else totals
    seconds = time.perf_counter() - epoch_start
    return {
        "epoch": epoch + 1,
        "train_loss": total_loss / max(count, 1),
        "train_top1": correct / max(count, 1),
        "lr": current_lr(optimizer),
        "images_per_sec": count / max(seconds, 1e-9),
        "seconds": seconds,
    }


def epoch_line(record: dict, epochs: int) -> str:
    line = (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}, "
            f"train top-1 {record['train_top1']:.4f}, {record['images_per_sec']:.1f} img/s")
    if "val_top1" in record:
        line += f", val top-1 {record['val_top1']:.4f}"
    return line
