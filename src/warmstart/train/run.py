"""One training run, end to end, as it reads: build (data, model, weights, what trains), open the
run directory, fit, evaluate, write the artifacts."""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .._version import __version__
from ..calibration import Calibration
from ..config import RunConfig
from ..data.exclude import exclude
from ..data.sources import SourceOptions, describe_splits, resolve_splits
from ..data.image_cache import cached_images
from ..data.transforms import data_config_for, eval_transform
from ..errors import UserError, excerpt
from ..evaluate import EvalResult, evaluate_model, metrics_from_logits
from ..models.create import create_model
from ..models.pretrained_classes import PretrainedStart, pretrained_start_for
from ..models.registry import resolve_architecture
from ..models.trainable import apply_strategy
from ..run_dir import RunDir, RunLock, new_run_dir, save_model, start_afresh
from ..stop import StopRequest, Stopped
from .checkpoint import TrainingInterrupted, load_checkpoint
from ..compute.distributed import Distributed, init_distributed, shutdown
from .history import QuietLog, TrainingLog
from .fit import fit
from .images import probe_head
from ..compute.runtime import Runtime
from ..progress import Reporter
from .session import Session
from .steps import FitResult


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    evaluation: EvalResult
    history: list[dict]


@dataclass
class Run:
    """What a run holds while it runs."""

    directory: RunDir
    config: RunConfig  # resolved: the learning rate filled in, no --out (re-running makes a new run)
    built: "Built"
    dist: Distributed
    reporter: Reporter
    start: float
    resume_state: dict | None = None
    calibration: Calibration | None = None  # the temperature fitted on val (None: uncalibrated)

    @property
    def main(self) -> bool:
        return self.dist.is_main  # only rank 0 writes in the run directory


def phase_rates(fitted: FitResult) -> dict:
    """Images per second of each phase, named for what it measured: on cached inputs the frozen
    network's extraction (None: all from the cache) and the head's (or tail's) epochs on them; on
    images the training itself (None where a phase did not run)."""
    cached = fitted.used_feature_cache
    return {
        "train_images_per_sec": None if cached else fitted.images_processed / max(fitted.seconds, 1e-9),
        "feature_extraction_images_per_sec": fitted.images_extracted / fitted.feature_seconds
        if cached and fitted.images_extracted and fitted.feature_seconds > 0 else None,
        "head_training_images_per_sec": fitted.images_processed / fitted.head_seconds
        if cached and fitted.images_processed and fitted.head_seconds > 0 else None,
    }


def describe_rates(metrics: dict) -> str:
    """`feature extraction 210.3 img/s, head training 5224.0 img/s, evaluation 198.1 img/s` (each
    phase that ran; 'from the cache' where nothing was computed)."""
    def rate(value, cached: bool = False) -> str:
        return "from the cache" if value is None and cached else f"{value:.1f} img/s"

    parts = []
    if metrics.get("train_images_per_sec") is not None:
        parts.append(f"training {rate(metrics['train_images_per_sec'])}")
    if metrics.get("feature_cache"):
        parts.append(f"feature extraction {rate(metrics.get('feature_extraction_images_per_sec'), True)}")
        if metrics.get("head_training_images_per_sec") is not None:
            parts.append(f"head training on the features {rate(metrics['head_training_images_per_sec'])}")
    parts.append(f"evaluation {rate(metrics.get('eval_images_per_sec'), True)}")
    return ", ".join(parts)


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


def _with_image_cache(splits: dict, data_config: dict, cache_dir: Path, config, reporter, runtime) -> dict:
    """Serve every split from the pre-resized image store (built on first use, through the run's loaders)."""
    resize = eval_transform(data_config).transforms[0]
    out = {}
    for name, images in splits.items():
        with reporter.bar(len(images), f"image cache {name}") as bar:
            out[name] = cached_images(images, resize, cache_dir, config.workers, bar.update, runtime.loader)
    return out


# settings that may differ when a run is resumed: they do not change what is computed
RESUMABLE_CHANGES = {"quiet", "workers", "out", "cache_dir", "checkpoint_every"}


def _resume_state(run_dir: RunDir, config: RunConfig, reporter: Reporter, weights_only: bool) -> dict:
    """The checkpoint to continue from, refusing a changed config that would break exactness."""
    if not run_dir.config.is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    if run_dir.trained and not weights_only:
        raise UserError(f"--resume {run_dir}: this run already finished; use --resume-weights-only to start a new "
                        f"run from its weights")
    state = load_checkpoint(run_dir.checkpoints, warn=reporter.warn)
    if state is None:
        raise UserError(f"--resume {run_dir}: no readable checkpoint in {run_dir.checkpoints}; "
                        f"checkpoints are written when the whole model trains (not on cached features)")
    saved = state["config"]
    current = config.replace(lr=config.resolved_lr(), out=None).to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and current[k] != saved.get(k))
    if changed and not weights_only:
        differences = ", ".join(f"{k} {excerpt(saved.get(k), 30)} -> {excerpt(current[k], 30)}" for k in changed)
        raise UserError(f"--resume {run_dir}: the settings differ from its checkpoint's ({differences}), so the run "
                        f"could not continue exactly; resume with the checkpoint's settings, or pass "
                        f"--resume-weights-only to start a new run from its weights")
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
        reporter = reporter or Reporter(config.quiet, silent=not dist.is_main)
        run = open_run(config, dist, reporter, resume, resume_weights_only)
        # rank 0 holds the run directory's lock: a second run with the same --out stops at once
        with RunLock(run.directory) if run.main else contextlib.nullcontext(), StopRequest():
            if run.main and run.resume_state is None:
                start_afresh(run.directory)
            try:
                return _journey(run, on_epoch)
            except TrainingInterrupted:
                raise
            except Stopped as stop:
                raise Stopped(stop.signum, _what_is_kept(run.directory, config)) from None
    finally:
        shutdown(dist)


def _journey(run: Run, on_epoch) -> RunResult:
    session = start_session(run, on_epoch)
    try:
        fitted = fit(run.built.model, run.built.trainable, run.built.splits, session, run.built.arch,
                     run.resume_state)
    finally:
        session.log.close()
    if run.main:  # before evaluation: a failure there loses nothing trained
        save_model(run.directory, run.built.model, model_meta(run))
    evaluation = calibrate(run, validate(run, fitted, session.runtime), fitted)
    if run.main:
        evaluation.write(run.directory)
        if run.calibration is not None:
            save_model(run.directory, run.built.model, model_meta(run))
    refitted = refit(run, session, fitted)
    if refitted is not None and run.main:
        save_model(run.directory, run.built.model, model_meta(run))
    test_metrics = test(run, fitted, session.runtime)
    metrics = write_artifacts(run, fitted, evaluation, {**test_metrics, **(refitted or {})})
    run.reporter.info(summary_line(metrics, evaluation, run.directory))
    return RunResult(run.directory.path, metrics, evaluation, fitted.history)


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
    pretrained: PretrainedStart | None = None  # the head's start from the pretrained classifier (its matched rows)

    @property
    def pretrained_start(self) -> PretrainedStart | None:
        """The start training pulls toward: None where no class matched."""
        return self.pretrained if self.pretrained is not None and bool(self.pretrained.matched.any()) else None


def start_head(model, report, train_set, config: RunConfig, reporter: Reporter) -> PretrainedStart | None:
    """The new head's start (`--head-init`): the pretrained classifier's rows for the classes it
    knows (its summary line says how many; restore_report.json lists every class)."""
    start = pretrained_start_for(model, report.old_head if report else {}, train_set.class_ids, train_set.class_names,
                           config)
    if start is not None:
        report.pretrained_labels, report.classes = start.labels, [m.to_dict() for m in start.matches]
    if config.epochs == 0 and (start is None or not bool(start.matched.any())):
        raise UserError("--epochs 0 keeps the head as it starts, and no class starts from the pretrained classifier "
                        "(its label set matched none): train for at least one epoch")
    return start


def build(config: RunConfig, reporter: Reporter) -> Built:
    """Scan the data, create the model, restore its weights and choose what trains (train, lr-find)."""
    resolve_architecture(config.model, config.weights)  # a bad name fails before any data scan
    splits = resolve_splits(config.data, config.val_fraction, config.seed, config.val_data,
                            options=SourceOptions.of(config))
    excluded = 0
    if config.exclude:
        splits, excluded = exclude(splits, config.exclude, config.drop_empty_classes)
    train_set = splits["train"]
    reporter.info(f"data: {describe_splits(splits)}" + (f" ({excluded} excluded by --exclude {config.exclude})"
                                                        if config.exclude else ""))
    for name in train_set.extra.get("dropped_classes", []):
        reporter.warn(f"dropped class {name}: it has no training images (--drop-empty-classes)")
    ignored = [entry for split in splits.values() for entry in split.ignored]
    for item, reason in ignored:
        reporter.warn(f"skipped {item}: {reason}")
    seed_everything(config.seed)
    model, report, arch = create_model(config.model, len(train_set.class_ids), config.weights, config.skip)
    start = start_head(model, report, train_set, config, reporter)
    trainable = apply_strategy(model, config.strategy, config.trainable, config.unfreeze_last)
    data_config = data_config_for(model, config.input_size, config.crop_pct, config.input_scale)
    return Built(splits, ignored, model, report, arch, trainable, data_config, start)


def open_run(config: RunConfig, dist: Distributed, reporter: Reporter, resume, resume_weights_only: bool) -> Run:
    """Build what the run starts from and find its directory: a new one, or the one it resumes."""
    start = time.perf_counter()
    Runtime.for_config(config, dist.local_rank)  # --pipeline gpu or fp16 without a GPU: refused before anything is read
    built = build(config, reporter)
    state = None
    if resume is not None:
        state = _resume_state(RunDir(resume), config, reporter, resume_weights_only)
        if [*state["class_ids"]] != built.splits["train"].class_ids:
            raise UserError(f"--resume {resume}: the data's classes differ from the checkpoint's")
    if state is not None and not resume_weights_only:
        directory = RunDir(resume)
    else:  # rank 0 makes the run directory; the others learn its name
        directory = RunDir(dist.broadcast(str(new_run_dir(config.out, config.model)) if dist.is_main else None))
    if state is not None and resume_weights_only:
        built.model.load_state_dict(state["model"])
        reporter.info(f"starting from the weights of {resume} (a new schedule)")
        state = None
    resolved = config.replace(lr=config.resolved_lr(), out=None)
    return Run(directory, resolved, built, dist, reporter, start, state)


def _what_is_kept(run_dir: RunDir, config: RunConfig) -> str:
    if run_dir.trained:
        return f"the trained model is saved in {run_dir}; evaluate it with: warmstart eval {run_dir}"
    cache = config.cache_dir or run_dir.cache
    return (f"what was computed is kept (feature cache in {cache}); continue with the same command and "
            f"--out {run_dir}")


def start_session(run: Run, on_epoch) -> Session:
    """Write the run's config and restore report, say what trains, prepare the model and caches."""
    config, built, dist, reporter = run.config, run.built, run.dist, run.reporter
    if run.main:
        config.save(run.directory.config)
    if built.report is not None:
        if run.main:
            built.report.save(run.directory.restore_report)
        reporter.info(built.report.summary())
    if built.pretrained is not None:
        reporter.info(built.pretrained.summary())
    if dist.active:
        reporter.info(f"distributed: {dist.world} processes, batch {config.batch_size} per process "
                      f"({config.batch_size * dist.world} per step)")
    total, trainable = (sum(p.numel() for p in built.model.parameters()), built.trainable.count(built.model))
    reporter.info(f"model {config.model} ({built.arch}), strategy {config.strategy}: "
                  f"{trainable:,} of {total:,} parameters train; run directory {run.directory}")
    runtime = Runtime.for_config(config, dist.local_rank)
    reporter.info(runtime.engine_line())
    runtime.prepare(built.model)
    cache_dir = Path(config.cache_dir) if config.cache_dir else run.directory.cache
    if config.image_cache:
        built.splits = _with_image_cache(built.splits, built.data_config, cache_dir, config, reporter, runtime)
    train_set, val_set = built.splits["train"], built.splits["val"]
    log = TrainingLog(run.directory, sample_items(val_set), train_set.class_names, eval_transform(built.data_config),
                      append=run.resume_state is not None, epochs=config.epochs) if run.main else QuietLog()
    return Session(config, built.data_config, runtime, reporter, log, dist, cache_dir,
                   run.directory.checkpoints if run.main else None, built.pretrained_start, on_epoch)


def model_meta(run: Run) -> dict:
    """What `predict` needs besides the weights (saved as model.json and inside the weights file)."""
    config, built = run.config, run.built
    return {
        "warmstart_version": __version__,
        "model": config.model,
        "architecture": built.arch,
        "class_ids": built.splits["train"].class_ids,
        "class_names": built.splits["train"].class_names,
        "data_config": built.data_config,
        "strategy": config.strategy,
        "weights": config.weights,
        "recipe": config.recipe,
        "tta": config.tta,  # prediction, serving and export average the image and its mirror image
        # probabilities are softmax(logits / temperature), fitted on val (None: not calibrated)
        "temperature": run.calibration.temperature if run.calibration else None,
        # how: on val's logits, or cross-fitted on train + val's out-of-fold logits (train/cross_fit.py)
        "temperature_fitted_on": run.calibration.fitted_on if run.calibration else None,
    }


def validate(run: Run, fitted: FitResult, runtime: Runtime) -> EvalResult:
    """Validation of the model as trained (from the training path's own outputs where it has them)."""
    if fitted.val_logits is not None:
        evaluation = metrics_from_logits(fitted.val_logits, fitted.val_labels, run.built.splits["train"].class_names)
        evaluation.seconds = fitted.val_seconds
        # validation features read back from the cache: nothing was computed, no rate to report
        evaluation.images_per_sec = evaluation.num_images / fitted.val_seconds if fitted.val_seconds > 0.01 else None
    else:
        evaluation = _evaluate(run, run.built.splits["val"], runtime)
        fitted.skipped.extend(evaluation.skipped)
    return evaluation


def calibrate(run: Run, evaluation: EvalResult, fitted: FitResult) -> EvalResult:
    """--calibrate: the temperature that makes held-out probabilities honest (fitted before a refit,
    and kept by it): on val's logits, or the cross-fitted ones of train + val where training made
    them (--calibration-fit); the evaluation as the saved model will answer."""
    cross_fitted = fitted.cross_fit_logits is not None and len(fitted.cross_fit_labels)
    if not evaluation.num_images and not cross_fitted:
        run.reporter.info("no validation split: the probabilities are not calibrated (they may be over- or "
                          "under-confident)")
        return evaluation
    if not run.config.calibrate:
        run.reporter.info(f"calibration off (--no-calibrate): val ECE {evaluation.ece:.3f}, NLL {evaluation.nll:.3f}")
        return evaluation
    if cross_fitted:
        run.calibration = Calibration.fit(fitted.cross_fit_logits, fitted.cross_fit_labels, "cross-fit")
    else:
        if run.config.calibration_fit == "cross-fit":
            run.reporter.info(f"calibration: --calibration-fit cross-fit needs a head trained on cached features; "
                              f"this run trained on {fitted.path or 'images'}: the temperature is fitted on val")
        run.calibration = Calibration.fit(evaluation.logits, evaluation.labels)
    run.reporter.info(run.calibration.line())
    return evaluation.scaled(run.calibration.temperature) if evaluation.num_images else evaluation


def refit(run: Run, session: Session, fitted: FitResult) -> dict | None:
    """--refit: validation was carved from train and has chosen the settings (and, with
    --keep-best, the epochs): train a fresh model on train + val with them; it becomes the run's
    model. Returns what metrics.json says of it (None when there is nothing to refit)."""
    config, splits = run.config, run.built.splits
    if not config.refit:
        return None
    if not len(splits["val"]):
        run.reporter.info("refit: there is no validation split (--val-fraction 0): the model already trained on "
                          "all of train and stays as it is")
        return None
    if not splits["val"].extra.get("carved"):
        run.reporter.info("refit: validation is a split of its own (not carved from train): the model stays as chosen")
        return None
    epochs = config.epochs if fitted.best_epoch is None else fitted.best_epoch
    images = len(splits["train"]) + len(splits["val"])
    start = "the probe alone" if config.probe_first else "the head as it started"
    run.reporter.info(f"refit: training again on train + val ({images:,} images) for "
                      f"{epochs or 'no'} epoch{'s' if epochs != 1 else ''}{f' ({start})' if not epochs else ''}")
    seed_everything(config.seed)
    model, _, _ = create_model(config.model, len(splits["train"].class_ids), config.weights, config.skip)
    if run.built.pretrained_start is not None:
        run.built.pretrained_start.apply(model.get_classifier())
    trainable = apply_strategy(model, config.strategy, config.trainable, config.unfreeze_last)
    session.runtime.prepare(model)
    chosen = config.replace(epochs=max(epochs, 1), keep_best=False, refit=False)
    quiet = replace(session, config=chosen, log=QuietLog(), checkpoints=None)
    if epochs:
        fit(model, trainable, splits, quiet, run.built.arch, include_val=True)
    elif config.probe_first:  # epoch 0 was the probe
        probe_head(model, splits, quiet, run.built.arch, include_val=True)
    # else epoch 0 was the head as it started: nothing to train
    run.built.model = model
    return {"refit": True, "refit_epochs": epochs, "refit_train_images": images}


def test(run: Run, fitted: FitResult, runtime: Runtime) -> dict:
    """The test split, where the data has one (e.g. Stanford Dogs' official test split)."""
    if "test" not in run.built.splits:
        return {}
    tested = _evaluate(run, run.built.splits["test"], runtime)
    uncalibrated = {"test_ece_uncalibrated": tested.ece, "test_nll_uncalibrated": tested.nll}
    if run.calibration is not None:
        tested = tested.scaled(run.calibration.temperature)
    tested.split = "test"
    if run.main:
        tested.write(run.directory)
    fitted.skipped.extend(tested.skipped)
    run.reporter.info(f"test top-1 {tested.top1:.4f}, top-5 {tested.top5:.4f} on {tested.num_images} images")
    return {"test_top1": tested.top1, "test_top5": tested.top5, "test_images": tested.num_images,
            "test_ece": tested.ece, "test_nll": tested.nll, **(uncalibrated if run.calibration else {})}


def _evaluate(run: Run, images, runtime: Runtime) -> EvalResult:
    config, built = run.config, run.built
    built.model.eval()
    forward = runtime.classify(built.model, built.data_config["input_size"], config.tta, say=run.reporter.info,
                               images=len(images))
    return evaluate_model(forward, images, eval_transform(built.data_config), runtime, max(config.batch_size, 64),
                          config.workers, run.dist)


def write_artifacts(run: Run, fitted: FitResult, evaluation: EvalResult, test_metrics: dict) -> dict:
    """history.json, skipped.txt and metrics.json; returns the metrics."""
    config, built, directory = run.config, run.built, run.directory
    skipped = sorted(dict(built.ignored + fitted.skipped).items())
    train_set = built.splits["train"]
    validated = evaluation.num_images > 0  # --val-fraction 0: no validation split
    metrics = {
        "top1": evaluation.top1 if validated else None,
        "top5": evaluation.top5 if validated else None,
        "num_classes": len(train_set.class_ids),
        "model": config.model,
        "architecture": built.arch,
        "strategy": config.strategy,
        "training_path": fitted.path,
        "recipe": config.recipe,
        "tta": config.tta,
        "epochs": config.epochs,
        "train_images": len(train_set),
        "val_images": evaluation.num_images,
        "trainable_params": built.trainable.count(built.model),
        "total_params": sum(p.numel() for p in built.model.parameters()),
        **phase_rates(fitted),
        "train_seconds": fitted.seconds,  # the training phase (feature extraction of train included)
        "eval_seconds": evaluation.seconds,
        "ece": evaluation.ece if validated else None,  # of the saved model's probabilities (calibrated)
        "nll": evaluation.nll if validated else None,
        "calibration": run.calibration.to_dict() if run.calibration else None,
        "feature_cache": fitted.used_feature_cache,
        "features_from_cache": fitted.features_from_cache,
        "precision": config.precision,
        "image_cache": config.image_cache,
        "feature_extraction_seconds": fitted.feature_seconds,
        "head_start": _head_start(built.pretrained, fitted),
        "crop_to_box": config.crop_to_box,
        "eval_images_per_sec": evaluation.images_per_sec,
        **test_metrics,
        "skipped_images": len(skipped),
        "processes": run.dist.world,
        "wall_seconds": time.perf_counter() - run.start,
    }
    if run.main:
        directory.history.write_text(json.dumps(fitted.history, indent=2))
        if skipped:
            directory.skipped.write_text("".join(f"{item}\t{reason}\n" for item, reason in skipped))
        directory.metrics.write_text(json.dumps(metrics, indent=2))
    return metrics


def _head_start(start: PretrainedStart | None, fitted: FitResult) -> dict:
    """Where the head started: the label set, how many classes it knew, that start's val top-1."""
    if start is None:
        return {"from": "zero"}
    matched = int(start.matched.sum())
    return {"from": "pretrained classifier" if matched else "zero", "labels": start.labels,
            "classes_matched": matched, "classes": len(start.matches), "val_top1": fitted.start_top1}


def summary_line(metrics: dict, evaluation: EvalResult, directory: RunDir) -> str:
    """Val (and test, where there is a test split) top-1 and top-5, speed, time, where it is."""
    scores = [f"val top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f} on {evaluation.num_images} images"
              if metrics["top1"] is not None else "no validation split (the last epoch is kept)"]
    if metrics.get("refit"):
        scores.append(f"saved: refit on train + val ({metrics['refit_train_images']:,} images)")
    if "test_top1" in metrics:
        scores.append(f"test top-1 {metrics['test_top1']:.4f}, top-5 {metrics['test_top5']:.4f} on "
                      f"{metrics['test_images']} images")
    return f"{'; '.join(scores)}; {describe_rates(metrics)}; {metrics['wall_seconds']:.1f}s; saved {directory}"
