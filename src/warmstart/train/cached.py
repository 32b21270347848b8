"""Training on cached inputs: the head on frozen features, or the trainable tail on the frozen
prefix's activations. The frozen part runs once per image (and view); epochs then take seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import seeds
from ..data.feature_cache import CachedFeatures, FeatureCache, View
from ..data.fingerprint import fingerprint_tensors
from ..data.loaders import EpochBatches, seeded_generator
from ..data.transforms import eval_transform, mirrored_eval_transform, train_transform
from ..evaluate import top1
from ..models.tta import combine_views
from ..models.trainable import set_train_mode
from ..models.weights import classifier_names
from ..stop import check
from .epoch import Progress, step_logger, train_one_epoch
from .runtime import Runtime
from .schedule import make_scheduler
from .session import Session
from .steps import (FitResult, after_epoch, build_optimizer, current_lr, epoch_line, epoch_record, log_skipped,
                    make_criterion, train_step)


def pre_logits(model: torch.nn.Module, runtime: Runtime | None = None):
    """The model's forward up to the classifier input (pooled features)."""
    runtime = runtime or Runtime(torch.device("cpu"), "fp32", False)
    return runtime.forward(lambda x: model.forward_head(model.forward_features(x), pre_logits=True))


def model_fingerprint(model: torch.nn.Module, arch: str, runtime: Runtime) -> str:
    """What the features depend on: the frozen weights' values and how they are computed."""
    head = set(classifier_names(model))
    frozen = {k: v for k, v in model.state_dict().items() if k not in head}
    return f"{arch}|{runtime.precision}|cl={runtime.channels_last}|{fingerprint_tensors(frozen)}"


def boundary_fingerprint(prefix: torch.nn.Module, arch: str, runtime: Runtime) -> str:
    """What the frozen prefix's activations depend on."""
    return (f"{arch}|prefix={len(prefix)}|{runtime.precision}|cl={runtime.channels_last}|"
            f"{fingerprint_tensors(prefix.state_dict())}")


def cached(cache: FeatureCache, images, view: View, forward, session: Session) -> CachedFeatures:
    """The outputs of `forward` for every image of a split, from the cache or computed now."""
    return cached_views(cache, [(view, images)], forward, session)[0]


def cached_views(cache: FeatureCache, requests: list[tuple], forward, session: Session) -> list[CachedFeatures]:
    """`cached` for several (view, images): what is missing is computed through one loader."""
    if session.dist.active:
        return [_cached_sharded(cache, images, view, forward, session) for view, images in requests]
    config, reporter = session.config, session.reporter
    labels = ", ".join(view.label for view, _ in requests)
    with reporter.bar(sum(len(images) for _, images in requests), f"features {labels}") as bar:
        outs = cache.features_of(requests, forward, max(config.batch_size, 64), config.workers,
                                 session.runtime.device, progress=bar.update, batched_on=session.runtime.batched_on)
    for (view, images), out in zip(requests, outs):
        if out.computed:
            reporter.info(f"features of {out.computed} {view.label} images in {out.seconds:.1f}s "
                          f"({out.computed / max(out.seconds, 1e-9):.1f} img/s)")
        else:
            reporter.info(f"features of {len(images)} {view.label} images from the cache")
    return outs


def _cached_sharded(cache, images, view: View, forward, session: Session) -> CachedFeatures:
    """Each rank extracts every world-th image into its own shard; then every rank reads all shards."""
    dist = session.dist

    def shard(rank: int) -> tuple:
        return images.subset(range(rank, len(images), dist.world)), f"{view.name}-shard{rank}of{dist.world}"

    subset, name = shard(dist.rank)
    own = cached(cache, subset, View(name, view.transform, view.index, view.item_seed), forward,
                 Session(session.config, session.data_config, session.runtime, session.reporter))
    dist.barrier()
    parts = [own if r == dist.rank else cache.features(View(shard(r)[1], view.transform, view.index, view.item_seed),
                                                       shard(r)[0], forward, session.config.batch_size, 0,
                                                       session.runtime.device, batched_on=session.runtime.batched_on)
             for r in range(dist.world)]
    first = next((p.features for p in parts if p.features.numel()), torch.zeros(0, 0))
    features = torch.zeros(len(images), *first.shape[1:])
    valid = torch.zeros(len(images), dtype=torch.bool)
    for r, part in enumerate(parts):
        if part.features.numel():
            features[r::dist.world] = part.features
        valid[r::dist.world] = part.valid
    return CachedFeatures(features, valid, torch.as_tensor(images.labels, dtype=torch.long),
                          max(dist.gather(own.seconds)), sum(p.computed for p in parts),
                          [s for p in parts for s in p.skipped])


def training_views(session: Session, name: str = "train") -> list[View]:
    """View 0 un-augmented, then K-1 augmented views (--cache-views K with --augment standard)."""
    config, data_config = session.config, session.data_config
    views = [View(name, eval_transform(data_config))]
    augmented = train_transform(data_config, "standard")
    for index in range(1, config.cache_views if config.augment != "none" else 1):
        views.append(View(name, augmented, index, seeds.for_view(config.seed, index)))
    return views


def validation_views(session: Session, name: str = "val") -> list[View]:
    """The validation split's view, and its mirror image with --tta."""
    views = [View(name, eval_transform(session.data_config))]
    if session.config.tta:
        views.append(View(f"{name}-mirror", mirrored_eval_transform(session.data_config)))
    return views


@dataclass
class CachedSplits:
    """A run's cached training views and validation views, and which rows are readable in all."""

    train: list[CachedFeatures]
    val: list[CachedFeatures]
    rows: torch.Tensor
    val_rows: torch.Tensor

    @classmethod
    def extract(cls, cache: FeatureCache, splits: dict, forward, session: Session, suffix: str = "",
                result: FitResult | None = None, include_val: bool = False) -> "CachedSplits":
        """The splits' views from the cache (computing what is missing). With `include_val` (a
        refit) val's images become training rows: under their own names, so val's un-augmented
        view is the one validation already cached."""
        train_views = [(v, splits["train"]) for v in training_views(session, "train" + suffix)]
        views = training_views if include_val else validation_views
        val_views = [(v, splits["val"]) for v in views(session, "val" + suffix)]
        outs = cached_views(cache, train_views + val_views, forward, session)  # one loader for them all
        train, val = outs[:len(train_views)], outs[len(train_views):]
        if include_val:
            train, val = [_concat(t, m) for t, m in zip(train, val)], []
        if result is not None:
            result.feature_seconds = sum(v.seconds for v in train)
            result.features_from_cache = not any(v.computed for v in train)
            result.skipped = sorted(dict([s for v in train + val for s in v.skipped]).items())
            log_skipped(session.reporter, result.skipped, {})
        return cls(train, val, *(torch.nonzero(torch.stack([v.valid for v in views]).all(0)).flatten()
                                 if views else torch.zeros(0, dtype=torch.long) for views in (train, val)))

    @property
    def labels(self) -> torch.Tensor:
        return self.train[0].labels[self.rows]

    @property
    def val_labels(self) -> torch.Tensor:
        return self.val[0].labels[self.val_rows] if self.val else torch.zeros(0, dtype=torch.long)

    def val_extraction_seconds(self) -> float:
        return sum(v.seconds for v in self.val)


def _concat(a: CachedFeatures, b: CachedFeatures) -> CachedFeatures:
    """The rows of `a`, then those of `b`."""
    if not len(b.labels):
        return a
    return CachedFeatures(torch.cat([a.features, b.features]), torch.cat([a.valid, b.valid]),
                          torch.cat([a.labels, b.labels]), a.seconds + b.seconds, a.computed + b.computed,
                          a.skipped + b.skipped)


class CachedBatches:
    """An epoch of (inputs, targets, labels) from cached views, in the image loader's order (the
    same sampler and seed) with a seeded choice of view per image."""

    def __init__(self, views: list[torch.Tensor], labels: torch.Tensor, config, to_input=lambda x: x,
                 rows: torch.Tensor | None = None):
        self.views, self.labels, self.to_input = views, labels, to_input
        self.rows = rows  # where each image's row is in the views (None: in order)
        self.sampler = EpochBatches(labels.tolist(), config.batch_size, config.seed, config.balance)
        self.view_choice = seeded_generator(seeds.for_view_choice(config.seed))
        self.epoch = 0

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch()

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        for keys in self.sampler:
            check()
            idx = torch.as_tensor([i for _, i in keys])
            source = idx if self.rows is None else self.rows[idx]
            x = self.views[0][source]
            if len(self.views) > 1:  # one gather per view, not one copy per image
                view = torch.randint(len(self.views), (len(idx),), generator=self.view_choice)
                for v in range(1, len(self.views)):
                    chosen = torch.nonzero(view == v).flatten()
                    if len(chosen):
                        x[chosen.to(x.device)] = self.views[v][source[chosen]].to(x.device)
            y = self.labels[idx]
            yield self.to_input(x), y, y
        self.epoch += 1


def _train_epochs(model, step, batches: CachedBatches, val_logits, session: Session, optimizer, desc: str,
                  before_epoch=lambda: None) -> list[dict]:
    """Epochs over cached batches: each validated on the cached validation views."""
    config, reporter = session.config, session.reporter
    history, progress, images, seconds = [], Progress(0), 0, 0.0
    log_step, log_last = step_logger(session.log, optimizer, current_lr)
    with reporter.bar(config.epochs, desc, unit="epoch") as bar:
        for epoch in range(config.epochs):
            check()
            before_epoch()
            progress = Progress(epoch, step=progress.step)
            start = time.perf_counter()
            totals = train_one_epoch(batches, step, progress, [log_step])
            log_last(progress)
            record = epoch_record(epoch, optimizer, totals, start)
            # an epoch on cached inputs lasts milliseconds: its own rate is noise, the run's so far is not
            images, seconds = images + totals.count, seconds + record["seconds"]
            record["images_per_sec"] = images / max(seconds, 1e-9)
            logits, labels = val_logits()
            if len(labels):
                record["val_top1"] = top1(logits, labels)
            history.append(record)
            after_epoch(session.log, record, model, session.runtime)
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_top1']:.3f}")
            if reporter.quiet:
                reporter.info(epoch_line(record, config.epochs))
    return history


def fit_head_on_features(model, splits, session: Session, cache: FeatureCache, include_val: bool = False) -> FitResult:
    """Every rank trains the same head on the same (sharded, then shared) features: deterministic,
    so rank 0's head is everyone's. `include_val`: train on val's images too (a refit)."""
    config, runtime = session.config, session.runtime
    result = FitResult(used_feature_cache=True)
    model.eval()
    start = time.perf_counter()
    data = CachedSplits.extract(cache, splits, pre_logits(torch.compile(model) if config.compile else model, runtime),
                                session, result=result, include_val=include_val)
    feats = [v.features[data.rows].to(runtime.device) for v in data.train]
    labels = data.labels.to(runtime.device)
    val_feats = [v.features[data.val_rows].to(runtime.device) for v in data.val] if len(data.val_rows) else []
    val_labels = data.val_labels.to(runtime.device)
    head = model.get_classifier()

    def val_logits():
        head.eval()
        with torch.inference_mode():
            return (combine_views([head(f) for f in val_feats]) if len(val_labels) else torch.empty(0)), val_labels

    train_start = time.perf_counter()
    if config.optimizer == "lbfgs":
        result.history = fit_head_lbfgs(model, torch.stack(feats), labels, val_logits, session)
    else:
        optimizer, scheduler, criterion = _plan(model, config, labels, len(splits["train"].class_ids), runtime)
        drop_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)

        def step(x, y):
            x = F.dropout(x, drop_rate, training=True) if drop_rate else x
            return train_step(head, x, y, criterion, optimizer, scheduler)

        batches = CachedBatches(feats, labels, config)
        result.history = _train_epochs(model, step, batches, val_logits, session, optimizer, "training head",
                                       head.train)
    result.images_processed = len(labels) * config.epochs
    result.seconds = time.perf_counter() - start - data.val_extraction_seconds()  # val features: evaluation's
    session.reporter.info(f"trained the head for {config.epochs} epochs in {time.perf_counter() - train_start:.1f}s "
                          f"on cached features ({len(feats)} view{'s' if len(feats) > 1 else ''})")
    logits, _ = val_logits()
    result.val_logits, result.val_labels = logits.cpu(), val_labels.cpu()
    result.val_seconds = data.val_extraction_seconds()
    return result


def _plan(model, config, labels: torch.Tensor, num_classes: int, runtime: Runtime):
    """Optimizer, schedule and loss for minibatch training on cached inputs."""
    optimizer = build_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, EpochBatches(labels.tolist(), config.batch_size, config.seed,
                                                               config.balance).batches_per_epoch())
    return optimizer, scheduler, make_criterion(config, labels.tolist(), num_classes, runtime.device)


class LogisticProbe:
    """--optimizer lbfgs: the head as an L2-regularised logistic regression fitted on all cached
    features at once (as scikit-learn's LogisticRegression and CLIP's linear probes do), with
    L-BFGS and a strong-Wolfe line search. One "epoch" is one L-BFGS step of up to 20 iterations.
    The penalty is weight_decay/2 x |W|^2 on the mean loss (biases are not penalised)."""

    def __init__(self, head, feats: torch.Tensor, labels: torch.Tensor, criterion, config):
        self.head, self.criterion, self.penalty = head, criterion, config.weight_decay
        self.x = feats.reshape(-1, feats.shape[-1])  # every stored view is a sample
        self.y = labels.repeat(feats.shape[0])
        self.views = feats.shape[0]
        self.optimizer = torch.optim.LBFGS(head.parameters(), lr=config.resolved_lr(), max_iter=20,
                                           history_size=20, line_search_fn="strong_wolfe")

    def _objective(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.head(self.x), self.y) + 0.5 * self.penalty * self.head.weight.pow(2).sum()
        loss.backward()
        return loss

    def step(self) -> tuple[float, int]:
        """One L-BFGS step; after it, the objective it minimises (mean loss + the L2 penalty) and the
        correct count over the training images."""
        self.optimizer.step(self._objective)
        with torch.no_grad():
            logits = self.head(self.x)
            loss = float(self.criterion(logits, self.y) + 0.5 * self.penalty * self.head.weight.pow(2).sum())
        return loss, int((logits.argmax(1) == self.y).sum()) // self.views


def fit_head_lbfgs(model, feats: torch.Tensor, labels: torch.Tensor, val_logits, session: Session) -> list[dict]:
    """The head fitted as a logistic regression (LogisticProbe), one L-BFGS step an epoch."""
    config = session.config
    criterion = make_criterion(config, labels.tolist(), model.get_classifier().out_features, labels.device)
    probe = LogisticProbe(model.get_classifier(), feats, labels, criterion, config)
    history = []
    for epoch in range(config.epochs):
        check()
        start = time.perf_counter()
        probe.head.train()
        loss, correct = probe.step()
        record = epoch_record(epoch, probe.optimizer, (loss * len(labels), correct, len(labels)), start)
        session.log.step(epoch + 1, loss, current_lr(probe.optimizer))
        logits, val_labels = val_logits()
        if len(val_labels):
            record["val_top1"] = top1(logits, val_labels)
        history.append(record)
        after_epoch(session.log, record, model, session.runtime)
        if session.reporter.quiet:
            session.reporter.info(epoch_line(record, config.epochs))
    return history


def fit_tail_on_activations(model, trainable, split: tuple, splits, session: Session,
                            cache: FeatureCache) -> FitResult:
    """The frozen prefix runs once per image (and view); each epoch runs only the trainable tail."""
    config, runtime = session.config, session.runtime
    prefix, tail = split
    result = FitResult(used_feature_cache=True)
    model.eval()
    start = time.perf_counter()
    data = CachedSplits.extract(cache, splits, runtime.forward(prefix), session, "-boundary", result)
    labels, val_labels = data.labels, data.val_labels

    def run_tail(x):
        return model.forward_head(tail(x))

    val_seconds = [0.0]

    def val_logits():
        begin = time.perf_counter()
        model.eval()
        forward = runtime.forward(run_tail)
        with torch.inference_mode():
            per_view = [torch.cat([forward(v.features[data.val_rows[i:i + 64]]).float().cpu()
                                   for i in range(0, len(data.val_rows), 64)]) for v in data.val] \
                if len(data.val_rows) else []
        val_seconds[0] += time.perf_counter() - begin
        return (combine_views(per_view) if per_view else torch.empty(0)), val_labels

    optimizer, scheduler, criterion = _plan(model, config, labels, len(splits["train"].class_ids), runtime)
    scaler = runtime.grad_scaler()

    def step(x, y):
        return train_step(run_tail, x, y, criterion, optimizer, scheduler, runtime, scaler)

    batches = CachedBatches([v.features for v in data.train], labels.to(runtime.device), config, runtime.inputs,
                            data.rows)
    result.history = _train_epochs(model, step, batches, val_logits, session, optimizer, "training (tail)",
                                   lambda: set_train_mode(model, trainable))
    result.images_processed = len(labels) * config.epochs
    result.seconds = time.perf_counter() - start - data.val_extraction_seconds() - val_seconds[0]
    result.val_logits, result.val_labels = val_logits()
    result.val_seconds = data.val_extraction_seconds() + val_seconds[0] / max(config.epochs + 1, 1)
    return result
