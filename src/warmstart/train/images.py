"""The images path: the whole (or partly frozen) network per batch of images, with checkpoints,
exact resume, mixup, EMA, gradual unfreezing and data parallelism; LP-FT's probe first."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV3

from ..data.feature_cache import FeatureCache
from ..data.transforms import eval_transform
from ..errors import UserError
from ..evaluate import outputs_of
from ..models.tta import FlipTTA
from ..models.trainable import TrainableSet, set_train_mode, with_frozen_norms
from ..models.unfreeze import GradualUnfreezing
from ..evaluate import top1
from ..stop import Stopped, requested
from .checkpoint import TrainingInterrupted, rng_state, save_checkpoint, set_rng_state
from .driver import Driven, Start, drive
from .epoch import Progress, Totals, step_logger, train_one_epoch
from .cached import CachedSplits, frozen_features, passes
from .head import feature_logits, scored_start
from .probe import fit_probe
from .mixing import BatchMixer
from .paths import FitRequest
from .pull import HeadFit, regularised
from .schedule import make_scheduler
from .session import Session
from .steps import (FitResult, build_optimizer, current_lr, epoch_record, log_skipped, make_criterion,
                    train_step)


class ImageTraining:
    """The whole (or partly frozen) model per batch of images, an epoch loop for `drive`.
    Checkpoints every epoch (and every --checkpoint-every steps); from a checkpoint it continues
    exactly: same schedule, data order, augmentation and random state."""

    fast = False

    def __init__(self, model, trainable: TrainableSet, train_set, session: Session):
        config, runtime, dist = session.config, session.runtime, session.dist
        self.model, self.trainable, self.train_set, self.session = model, trainable, train_set, session
        self.loader = runtime.training_loader(train_set, session.data_config, config, dist.rank, dist.world)
        self.unfreezing = GradualUnfreezing(config) if config.unfreeze_schedule else None
        self.criterion, head_decay = regularised(
            make_criterion(config, train_set.labels, len(train_set.class_ids), runtime.device), model,
            session.pretrained, HeadFit.of(config), len(train_set))
        self.optimizer = build_optimizer(model, config, self.unfreezing.final_names(model) if self.unfreezing else None,
                                         head_decay=head_decay)
        self.scheduler = make_scheduler(self.optimizer, config, self.loader.batch_sampler.batches_per_epoch())
        self.mix = BatchMixer(config, len(train_set.class_ids))
        self.ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
        self.scaler = runtime.grad_scaler()
        if dist.active and config.sync_bn:
            if runtime.device.type != "cuda":
                raise UserError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU)")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.trainable = with_frozen_norms(self.model, trainable)  # the converted layers are new modules
        self.forward = self.wrap()
        self.result, self.best, self.seen = FitResult(), -1.0, {}
        self.kept_into, self.val_set = self.model, None
        self.val_loader = None  # made at the first validation, kept for the run
        self.progress = Progress(0)

    def wrap(self):
        """DDP (rebuilt when the trainable set changes: it syncs what trained when it was made) and compile."""
        forward, runtime = self.model, self.session.runtime
        if self.session.dist.active:
            forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        return torch.compile(forward) if self.session.config.compile else forward

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.progress = Progress(state["epoch"], state["batch"], state["global_step"], Totals(*state["totals"]))
        self.best = state["best_top1"]
        self.result.history = list(state["history"])
        self.session.reporter.info(f"resuming at epoch {state['epoch'] + 1}, batch {state['batch']} "
                                   f"(step {state['global_step']})")

    def checkpoint(self, epoch: int, batch: int, totals: Totals, is_best: bool = False) -> Path | None:
        if self.session.checkpoints is None:
            return None
        self.latest_checkpoint = save_checkpoint(self.session.checkpoints, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": rng_state(), "epoch": epoch, "batch": batch, "global_step": self.progress.step,
            "totals": list(totals.values()), "history": self.result.history, "best_top1": self.best,
            "class_ids": self.train_set.class_ids, "ema": self.ema.module.state_dict() if self.ema else {},
            "config": self.session.config.to_dict()}, best=is_best)
        return self.latest_checkpoint

    def batches(self, bar):
        """The epoch's (inputs, targets, labels) on the device, mixed where --mixup/--cutmix say."""
        runtime = self.session.runtime
        for batch in self.loader:
            log_skipped(self.session.reporter, batch.skipped, self.seen)
            bar.update(len(batch.labels) + len(batch.skipped))
            if not len(batch.labels):
                yield None, None, batch.labels
                continue
            images, labels = runtime.inputs(batch.images), batch.labels.to(runtime.device)
            inputs, targets = self.mix(images, labels)
            yield inputs, targets, labels

    def step(self, inputs, targets):
        if inputs is None:  # no readable image in the batch: the schedule moves on all the same
            self.scheduler.step()
            return None
        out = train_step(self.forward, inputs, targets, self.criterion, self.optimizer, self.scheduler,
                         self.session.runtime, self.scaler)
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.step)
        return out

    def after_step(self, progress: Progress) -> None:
        """A stop (every rank at the same step) or a --checkpoint-every checkpoint."""
        config, per_epoch = self.session.config, self.loader.batch_sampler.batches_per_epoch()
        if self.session.dist.any(requested() is not None):
            path = self.checkpoint(progress.epoch, progress.batch, progress.totals)
            raise TrainingInterrupted(requested() or signal.SIGTERM, path)
        if config.checkpoint_every and progress.step % config.checkpoint_every == 0 and progress.batch < per_epoch:
            self.checkpoint(progress.epoch, progress.batch, progress.totals)

    def unfreeze(self, epoch: int) -> None:
        now = self.unfreezing.apply(self.model, epoch)
        if now.trainable != self.trainable.trainable:
            what = self.unfreezing.describe(self.unfreezing.step_at(epoch))
            self.session.reporter.info(f"epoch {epoch + 1}: now training {what} ({now.count(self.model):,} parameters)")
            self.trainable, self.forward = now, self.wrap()

    def run_epoch(self, epoch: int) -> dict:
        """One epoch (from a checkpoint's batch where it resumes); its record, summed over ranks."""
        session, progress = self.session, self.progress
        if self.unfreezing is not None:
            self.unfreeze(epoch)
        set_train_mode(self.model, self.trainable)
        if progress.epoch != epoch:
            self.progress = progress = Progress(epoch, step=progress.step)
        self.loader.batch_sampler.set_epoch(epoch, progress.batch)
        start = time.perf_counter()
        log_step, log_last = step_logger(session.log, self.optimizer, current_lr)
        with session.reporter.bar(len(self.train_set), f"epoch {epoch + 1}/{session.config.epochs}") as bar:
            totals = train_one_epoch(self.batches(bar), self.step, progress, [self.after_step, log_step])
        log_last(progress)
        totals = session.dist.sum(list(totals.values()))  # over all ranks
        self.result.images_processed += int(totals[2])
        return epoch_record(epoch, self.optimizer, (totals[0], int(totals[1]), int(totals[2])), start)

    def validate(self) -> dict[str, tuple[float, object]]:
        """Val top-1 of the weights that count: the EMA's (and with --keep-best the raw ones too), all
        from one pass over val, through one loader that lives as long as the run (no start-up per epoch)."""
        config, session = self.session.config, self.session
        candidates = {"EMA weights": self.ema.module} if self.ema is not None else {}
        if self.ema is None or config.keep_best:
            candidates["raw weights"] = self.model
        if self.val_loader is None:
            self.val_loader = session.runtime.loader(self.val_set, eval_transform(session.data_config), max(config.batch_size, 64),
                                                      config.workers, epochs=config.epochs)
        modules = [FlipTTA(m) if config.tta else m for m in candidates.values()]
        for module in modules:
            module.eval()
        out = outputs_of(self.val_loader, session.runtime.forward(lambda x: torch.stack([m(x) for m in modules], 1)),
                         session.runtime.device)
        return {which: (top1(out.outputs[:, k], out.labels) if len(out.labels) else 0.0, module)
                for k, (which, module) in enumerate(candidates.items())}

    def end_epoch(self, epoch: int, record: dict, is_best: bool) -> None:
        self.best = max(self.best, record.get("val_top1", -1.0))
        self.progress = Progress(epoch + 1, step=self.progress.step)
        self.checkpoint(epoch + 1, 0, Totals(), is_best)

    def finish(self) -> None:
        if self.ema is not None:  # the averaged weights are the run's model
            self.model.load_state_dict(self.ema.module.state_dict())

    def fit(self, val_set, resume: dict | None = None, probe_top1: float | None = None) -> FitResult:
        """Train from the start (or `resume`'s checkpoint); the start (the probe, or the head from the
        pretrained classifier) counts as epoch 0 for --keep-best."""
        session = self.session
        if resume is not None:
            self.restore(resume)
        self.val_set = val_set
        validating = val_set is not None and len(val_set) > 0 and session.checkpoints is not None
        start = Start("the probe it started from", probe_top1) if probe_top1 is not None else scored_start(session)
        began = time.perf_counter()
        try:
            driven = drive(self, session, validating, self.progress.epoch,
                           Driven(self.result.history, best_top1=self.best), start)
        except Stopped as stop:  # between two epochs or while validating: resume from the latest checkpoint
            if getattr(self, "latest_checkpoint", None) is None:
                raise
            raise TrainingInterrupted(stop.signum, self.latest_checkpoint) from None
        self.result.seconds = time.perf_counter() - began - driven.validation_seconds
        self.result.skipped = sorted(self.seen.items())
        self.result.took(driven)
        return self.result


def train_on_images(request: FitRequest) -> FitResult:
    """The images path (LP-FT: the probe's head first, unless resuming)."""
    model, splits, session = request.model, request.with_val_in_train(), request.session
    probe = probe_head(model, splits, session, request.arch) \
        if session.config.probe_first and request.resume is None else None
    return ImageTraining(model, request.trainable, splits["train"], session).fit(splits.get("val"), request.resume,
                                                                                   probe)


def probe_head(model, splits: dict, session: Session, arch: str = "", include_val: bool = False) -> float | None:
    """LP-FT's first stage: `--recipe linear-probe`'s head (HeadFit.linear_probe, with the run's
    --head-prior) fitted from the head's start on the frozen network's cached features of each
    training photo's un-augmented view (with `include_val`, val's too); the head is left in
    `model`. Returns its val top-1 (None without validation)."""
    runtime = session.runtime
    model.eval()
    forward, fingerprint = frozen_features(model, arch, runtime, session.data_config["input_size"],
                                           session.reporter.info, passes(session, splits))
    cache = FeatureCache(session.cache_dir, fingerprint, session.reporter.warn)
    data = CachedSplits.extract(cache, splits, forward, session, include_val=include_val)
    head = model.get_classifier()
    fit_probe(data.train[0].features[data.rows].to(runtime.device), data.labels.to(runtime.device),
              session.pretrained, HeadFit.linear_probe(session.config.head_prior), head=head)
    if not len(data.val_rows):
        return None
    logits, labels = feature_logits(head, [v.features[data.val_rows].to(runtime.device) for v in data.val],
                                    data.val_labels.to(runtime.device))()
    score = top1(logits, labels)
    session.reporter.info(f"probe (LP-FT's first stage): val top-1 {score:.4f}; the network trains from this head")
    return score
