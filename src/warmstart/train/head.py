"""Training on cached inputs: the head on the frozen network's features (minibatches, or the
L-BFGS logistic probe), or the trainable tail on the frozen prefix's activations. The frozen
part ran once per image and view (`cached.py`); each path here is an epoch loop for `drive`."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from ..data.feature_cache import FeatureCache
from ..data.loaders import EpochBatches
from ..evaluate import top1
from ..models.outputs import PreLogits
from ..models.tta import combine_views
from ..models.trainable import set_train_mode
from . import cross_fit
from .cached import CachedBatches, CachedSplits, frozen_features, frozen_prefix, passes
from .driver import Start, drive
from .epoch import Progress, step_logger, train_one_epoch
from .paths import FitRequest
from .probe import LogisticProbe, fit_probe
from .pull import HeadFit, regularised
from ..compute.runtime import Runtime
from .schedule import make_scheduler
from .session import Session
from .steps import FitResult, build_optimizer, current_lr, epoch_record, make_criterion, train_step

PRETRAINED_ALONE = "pretrained classifier alone"


def scored_start(session: Session) -> Start | None:
    """The head starts from the pretrained classifier: score it before training (epoch 0)."""
    return Start(PRETRAINED_ALONE) if session.pretrained is not None else None


class CachedLoop:
    """What the loops on cached inputs share: validation on the cached val views, whose weights
    are kept (the head, or the model for a tail), and nothing to do between epochs."""

    fast = True

    def __init__(self, model, kept_into, val_logits, session: Session):
        self.model, self.kept_into, self.val_logits, self.session = model, kept_into, val_logits, session

    def validate(self) -> dict:
        logits, labels = self.val_logits()
        return {"trained weights": (top1(logits, labels), self.kept_into)}

    def end_epoch(self, epoch: int, record: dict, is_best: bool) -> None:
        pass

    def finish(self) -> None:
        pass


class MinibatchLoop(CachedLoop):
    """SGD/AdamW epochs over cached batches (`step`: one optimizer step on a batch)."""

    def __init__(self, model, kept_into, val_logits, session: Session, plan: tuple, batches: CachedBatches,
                 before_epoch):
        super().__init__(model, kept_into, val_logits, session)
        self.optimizer, self.step = plan
        self.batches, self.before_epoch = batches, before_epoch
        self.progress, self.images, self.seconds = Progress(0), 0, 0.0

    def run_epoch(self, epoch: int) -> dict:
        self.before_epoch()
        self.progress = Progress(epoch, step=self.progress.step)
        log_step, log_last = step_logger(self.session.log, self.optimizer, current_lr)
        start = time.perf_counter()
        totals = train_one_epoch(self.batches, self.step, self.progress, [log_step])
        log_last(self.progress)
        record = epoch_record(epoch, self.optimizer, totals, start)
        # an epoch on cached inputs lasts milliseconds: its own rate is noise, the run's so far is not
        self.images, self.seconds = self.images + totals.count, self.seconds + record["seconds"]
        record["images_per_sec"] = self.images / max(self.seconds, 1e-9)
        return record


class ProbeLoop(CachedLoop):
    """The logistic probe, one L-BFGS step an epoch."""

    def __init__(self, model, feats: torch.Tensor, labels: torch.Tensor, val_logits, session: Session):
        head = model.get_classifier()
        super().__init__(model, head, val_logits, session)
        criterion = make_criterion(session.config, labels.tolist(), head.out_features, labels.device)
        self.probe = LogisticProbe(head, feats, labels, HeadFit.of(session.config), session.pretrained, criterion)
        self.count = len(labels)

    def run_epoch(self, epoch: int) -> dict:
        start = time.perf_counter()
        self.probe.head.train()
        self.probe.trace.clear()
        loss, correct = self.probe.step()
        self.session.log.step(epoch + 1, loss, current_lr(self.probe.optimizer))
        record = epoch_record(epoch, self.probe.optimizer, (loss * self.count, correct, self.count), start)
        record["objective"] = list(self.probe.trace)  # per L-BFGS evaluation in this step (history.json)
        return record


def feature_logits(head, views: list[torch.Tensor], labels: torch.Tensor):
    """The head's val logits on cached feature views (combined as TTA combines them)."""
    def val_logits():
        head.eval()
        with torch.inference_mode():
            return (combine_views([head(f) for f in views]) if len(labels) else torch.empty(0)), labels

    return val_logits


def fit_head_on_features(model, splits, session: Session, features: tuple, include_val: bool = False) -> FitResult:
    """Every rank trains the same head on the same (sharded, then shared) features: deterministic,
    so rank 0's head is everyone's. `features`: (the cache, the frozen forward that fills it).
    `include_val`: train on val's images too (a refit)."""
    config, runtime = session.config, session.runtime
    result = FitResult(used_feature_cache=True)
    model.eval()
    start = time.perf_counter()
    cache, forward = features
    data = CachedSplits.extract(cache, splits, forward, session, result=result, include_val=include_val)
    feats = [v.features[data.rows].to(runtime.device) for v in data.train]
    labels = data.labels.to(runtime.device)
    val_labels = data.val_labels.to(runtime.device)
    head = model.get_classifier()
    val_logits = feature_logits(head, [v.features[data.val_rows].to(runtime.device) for v in data.val]
                                if len(data.val_rows) else [], val_labels)
    train_start = time.perf_counter()
    start_state = copy.deepcopy(head.state_dict())  # what every cross-fitted head starts from
    if not config.epochs:
        loop = CachedLoop(model, head, val_logits, session)
    elif config.optimizer == "lbfgs":
        loop = ProbeLoop(model, torch.stack(feats), labels, val_logits, session)
    else:
        loop = MinibatchLoop(model, head, val_logits, session, _head_plan(model, labels, session, len(head.weight)),
                             CachedBatches(feats, labels, config), head.train)
    driven = drive(loop, session, bool(len(val_labels)), start=scored_start(session))
    result.took(driven)
    result.images_processed = len(labels) * config.epochs
    result.seconds = time.perf_counter() - start - data.val_extraction_seconds()  # val features: evaluation's
    result.head_seconds = time.perf_counter() - train_start
    session.reporter.info(f"trained the head for {config.epochs} epochs in {result.head_seconds:.1f}s "
                          f"on cached features ({len(feats)} view{'s' if len(feats) != 1 else ''})")
    logits, _ = val_logits()
    result.val_logits, result.val_labels = logits.cpu(), val_labels.cpu()
    result.val_seconds = data.val_extraction_seconds()
    if not include_val and feats and cross_fit.wanted(config, len(val_labels)):
        val_views = [v.features[data.val_rows].to(runtime.device) for v in data.val] if len(data.val_rows) else []
        result.cross_fit_logits, result.cross_fit_labels = cross_fitted(model, start_state, session, feats, labels,
                                                                        val_views, val_labels)
    return result


def cross_fitted(model, start: dict, session: Session, train: list[torch.Tensor], labels: torch.Tensor,
                 val: list[torch.Tensor], val_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The out-of-fold logits of every train and val photo (cross_fit.py): each fold's head trained
    from the same start, the same way as the run's head, on the other photos' training views (a val
    photo's un-augmented view stands in for each of its views); a held photo is scored as val is
    (the un-augmented view; with --tta, a val photo's views combined)."""
    n = len(labels)
    views = [torch.cat([t, val[0]]) for t in train] if val else train
    everyone = torch.cat([labels, val_labels]) if val else labels

    def fit_and_score(fitted_on: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        head = _fold_head(model, start, session, [v[fitted_on.to(v.device)] for v in views],
                          everyone[fitted_on.to(everyone.device)])
        with torch.inference_mode():
            out = head(views[0][held.to(views[0].device)])
            own = held[held >= n] - n  # val photos: scored on val's own views
            if len(own) and len(val) > 1:
                out[(held >= n).to(out.device)] = combine_views([head(v[own.to(v.device)]) for v in val])
        return out.float()

    session.reporter.info(f"calibration: cross-fitting the head on {len(everyone)} train + val images "
                          f"({cross_fit.FOLDS} folds) for out-of-fold logits")
    return cross_fit.out_of_fold(everyone.cpu(), len(model.get_classifier().weight), fit_and_score,
                                 seed=session.config.seed), everyone.cpu()


def _fold_head(model, start: dict, session: Session, feats: list[torch.Tensor], labels: torch.Tensor):
    """A head trained as the run's was (its optimizer, schedule, epochs, start and pull), quietly."""
    config = session.config
    if config.optimizer == "lbfgs":
        head = copy.deepcopy(model.get_classifier())
        head.load_state_dict(start)
        criterion = make_criterion(config, labels.tolist(), head.out_features, labels.device)
        return fit_probe(torch.stack(feats), labels, session.pretrained, HeadFit.of(config), head=head,
                         criterion=criterion)
    # the frozen weights shared, not copied (a large network 5 times over); what trains, and every
    # buffer (BatchNorm statistics, small), copied
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    fold_model = copy.deepcopy(model, memo=frozen)
    head = fold_model.get_classifier()
    head.load_state_dict(start)
    _, step = _head_plan(fold_model, labels, session, len(head.weight))
    batches, progress = CachedBatches(feats, labels, config), Progress(0)
    for epoch in range(config.epochs):
        head.train()
        progress = Progress(epoch, step=progress.step)
        train_one_epoch(batches, step, progress)
    return head.eval()


def _head_plan(model, labels: torch.Tensor, session: Session, num_classes: int) -> tuple:
    """The head's optimizer and its step on a batch of features (dropout as the model's own)."""
    optimizer, scheduler, criterion = _plan(model, session, labels, num_classes)
    head, drop_rate = model.get_classifier(), float(getattr(model, "drop_rate", 0.0) or 0.0)

    def step(x, y):
        x = F.dropout(x, drop_rate, training=True) if drop_rate else x
        return train_step(head, x, y, criterion, optimizer, scheduler)

    return optimizer, step


def _plan(model, session: Session, labels: torch.Tensor, num_classes: int):
    """Optimizer, schedule and loss for minibatch training on cached inputs; with a pretrained
    start the head's rows are pulled toward it (pull.regularised)."""
    config, runtime = session.config, session.runtime
    criterion, head_decay = regularised(make_criterion(config, labels.tolist(), num_classes, runtime.device), model,
                                        session.pretrained, HeadFit.of(config), len(labels))
    optimizer = build_optimizer(model, config, head_decay=head_decay)
    scheduler = make_scheduler(optimizer, config, EpochBatches(labels.tolist(), config.batch_size, config.seed,
                                                               config.balance).batches_per_epoch())
    return optimizer, scheduler, criterion


def tail_logits(model, run_tail, data: CachedSplits, runtime: Runtime, seconds: list):
    """The tail's val logits on the cached activations, 64 at a time (the time spent added up)."""
    def val_logits():
        begin = time.perf_counter()
        model.eval()
        forward = runtime.forward(run_tail)
        with torch.inference_mode():
            per_view = [torch.cat([forward(v.features[data.val_rows[i:i + 64]]).float().cpu()
                                   for i in range(0, len(data.val_rows), 64)]) for v in data.val] \
                if len(data.val_rows) else []
        seconds[0] += time.perf_counter() - begin
        return (combine_views(per_view) if per_view else torch.empty(0)), data.val_labels

    return val_logits


def fit_tail_on_activations(model, trainable, split: tuple, splits, session: Session, activations: tuple) -> FitResult:
    """The frozen prefix runs once per image (and view); each epoch runs only the trainable tail.
    `activations`: (the cache, the prefix's frozen forward that fills it)."""
    config, runtime = session.config, session.runtime
    tail = split[1]
    result = FitResult(used_feature_cache=True)
    model.eval()
    start = time.perf_counter()
    cache, forward = activations
    data = CachedSplits.extract(cache, splits, forward, session, "-boundary", result)
    labels = data.labels

    def run_tail(x):
        return model.forward_head(tail(x))

    val_seconds = [0.0]
    val_logits = tail_logits(model, run_tail, data, runtime, val_seconds)
    optimizer, scheduler, criterion = _plan(model, session, labels, len(splits["train"].class_ids))
    scaler = runtime.grad_scaler()

    def step(x, y):
        return train_step(run_tail, x, y, criterion, optimizer, scheduler, runtime, scaler)

    batches = CachedBatches([v.features for v in data.train], labels.to(runtime.device), config, runtime.inputs,
                            data.rows)
    loop = MinibatchLoop(model, model, val_logits, session, (optimizer, step), batches,
                         lambda: set_train_mode(model, trainable))
    driven = drive(loop, session, bool(len(data.val_rows)), start=scored_start(session))
    result.took(driven)
    result.images_processed = len(labels) * config.epochs
    result.seconds = time.perf_counter() - start - data.val_extraction_seconds() - val_seconds[0]
    result.head_seconds = result.seconds - result.feature_seconds
    result.val_logits, result.val_labels = val_logits()
    result.val_seconds = data.val_extraction_seconds() + val_seconds[0] / max(config.epochs + 1, 1)
    return result


def train_on_features(request: FitRequest) -> FitResult:
    """The cached-features path: the frozen network's features from the cache, the head on them."""
    session = request.session
    request.model.eval()
    forward, fingerprint = frozen_features(request.model, request.arch, session.runtime,
                                           session.data_config["input_size"], session.reporter.info,
                                           passes(session, request.splits))
    if session.config.compile and forward.engine == "torch":  # the same features, compiled
        forward = session.runtime.forward(torch.compile(session.runtime.for_inference(PreLogits(request.model))))
    cache = FeatureCache(session.cache_dir, fingerprint, session.reporter.warn)
    return fit_head_on_features(request.model, request.splits, session, (cache, forward), request.include_val)


def train_on_activations(request: FitRequest) -> FitResult:
    """The cached-activations path (--cache-boundary): the frozen prefix's outputs from the cache."""
    session, split = request.session, request.path.split
    split[0].eval()
    forward, fingerprint = frozen_prefix(split[0], request.arch, session.runtime, session.data_config["input_size"],
                                         session.reporter.info, passes(session, request.splits))
    cache = FeatureCache(session.cache_dir, fingerprint, session.reporter.warn)
    return fit_tail_on_activations(request.model, request.trainable, split, request.with_val_in_train(), session,
                                   (cache, forward))
