"""The one epoch driver. Every training path (images, cached features, cached activations, the
L-BFGS probe) says how to run one epoch and how to score its weights on val; `drive` owns the
rest: stop checks, validation, the history, the log, the caller's per-epoch callback, the epoch
line and --keep-best (raw or EMA weights, or the head it started from as epoch 0)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import Diverged
from ..stop import check
from .session import Session
from .steps import after_epoch, epoch_line


class EpochLoop(Protocol):
    """What a training path gives the driver."""

    model: torch.nn.Module  # the network (the log's prediction grid)
    kept_into: torch.nn.Module  # where kept weights go back (the model, or only its head)
    fast: bool  # epochs take milliseconds: one bar over the epochs, epoch lines only with --quiet

    def run_epoch(self, epoch: int) -> dict:
        """Train one epoch; its record (epoch_record)."""

    def validate(self) -> dict[str, tuple[float, torch.nn.Module]]:
        """Val top-1 of each set of weights that may be kept, first the one the run reports, with
        the module whose weights they are (empty without validation)."""

    def end_epoch(self, epoch: int, record: dict, is_best: bool) -> None:
        """After the epoch is recorded (a checkpoint)."""

    def finish(self) -> None:
        """After the last epoch, before kept weights go back (the EMA becomes the model)."""


class BestWeights:
    """The weights with the best val top-1 seen so far (--keep-best), and where they came from."""

    def __init__(self):
        self.score, self.epoch, self.which, self.state = -1.0, None, "", None

    def offer(self, epoch: int, which: str, score: float, module: torch.nn.Module) -> None:
        if score > self.score:
            self.score, self.epoch, self.which = score, epoch, which
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Driven:
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None  # the epoch whose weights were kept (0: the start), None: the last
    best_top1: float = -1.0  # the best val top-1 of any epoch (checkpoints mark it)
    validation_seconds: float = 0.0
    start_top1: float | None = None  # the starting weights' val top-1, where measured


@dataclass
class Start:
    """The weights training starts from, as a candidate of their own (epoch 0): what they are
    ("the probe it started from") and their val top-1 when already known (else measured)."""

    which: str
    top1: float | None = None


def drive(loop: EpochLoop, session: Session, validating: bool, first_epoch: int = 0,
          driven: Driven | None = None, start: Start | None = None) -> Driven:
    """Epochs `first_epoch`..epochs of `loop`, validated where `validating`; then, with
    --keep-best, the best epoch's weights are put back (the start counts as epoch 0)."""
    config, reporter = session.config, session.reporter
    driven = driven or Driven()
    keep = BestWeights() if config.keep_best and validating else None
    if start is not None and validating and first_epoch == 0:
        _score_start(loop, start, keep, driven, reporter)
    bar = reporter.bar(config.epochs, "training", unit="epoch") if loop.fast else contextlib.nullcontext()
    with bar:
        for epoch in range(first_epoch, config.epochs):
            check()
            record = loop.run_epoch(epoch)
            _stop_if_diverged(record, config)
            if validating:
                val_start = time.perf_counter()
                scores = loop.validate()
                driven.validation_seconds += time.perf_counter() - val_start
                record["val_top1"] = next(iter(scores.values()))[0]
                for which, (score, module) in scores.items():
                    if keep is not None:
                        keep.offer(epoch + 1, which, score, module)
            driven.history.append(record)
            _report_epoch(loop, session, record, bar)
            is_best = record.get("val_top1", -1.0) > driven.best_top1
            driven.best_top1 = max(driven.best_top1, record.get("val_top1", -1.0))
            loop.end_epoch(epoch, record, is_best)
    loop.finish()
    driven.best_epoch = config.epochs
    if keep is not None and keep.state is not None:
        loop.kept_into.load_state_dict(keep.state)
        driven.best_epoch = keep.epoch
        reporter.info(f"kept epoch {keep.epoch} ({keep.which}): val top-1 {keep.score:.4f}")
    return driven


def _stop_if_diverged(record: dict, config) -> None:
    """A non-finite loss ends the run at once, before the epoch is recorded or checkpointed: the
    weights are garbage from here on, and a model saved from them would answer NaN."""
    loss = record.get("train_loss")
    if loss is None or math.isfinite(loss):
        return
    causes = [f"--lr (now {config.resolved_lr():g})"]
    if config.head_prior:
        causes.append(f"--head-prior (now {config.head_prior:g})")
    raise Diverged(f"training diverged in epoch {record['epoch']}: the loss is {loss}; no model was saved (earlier "
                   f"checkpoints are kept): lower {' or '.join(causes)}")


def _score_start(loop: EpochLoop, start: Start, keep: BestWeights | None, driven: Driven, reporter) -> None:
    if start.top1 is None:  # measured now (on cached features it costs nothing)
        score, module = next(iter(loop.validate().values()))
        reporter.info(f"{start.which}: val top-1 {score:.4f}")
    else:
        score, module = start.top1, loop.kept_into
    driven.start_top1 = score
    if keep is not None:
        keep.offer(0, start.which, score, module)


def _report_epoch(loop: EpochLoop, session: Session, record: dict, bar) -> None:
    """The epoch to the log (and the caller's callback, which may stop the run), then the line."""
    after_epoch(session.log, record, loop.model, session.runtime)
    if session.on_epoch is not None:
        session.on_epoch(record)
    if loop.fast:
        bar.update(1)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_top1']:.3f}")
    if not loop.fast or session.reporter.quiet:
        session.reporter.info(epoch_line(record, session.config.epochs))
