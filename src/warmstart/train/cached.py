"""Training on cached inputs: the head on frozen features, or the trainable tail on the frozen
prefix's activations. The frozen part runs once per image (and view); epochs then take seconds."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..data.feature_cache import CachedFeatures, FeatureCache
from ..data.fingerprint import fingerprint_tensors
from ..data.loaders import EpochBatches, seeded_generator
from ..data.transforms import eval_transform, mirrored_eval_transform, train_transform
from ..models.tta import combine_views
from ..models.trainable import TrainableSet, only_head_trains, set_train_mode
from ..models.weights import classifier_names
from ..stop import check
from .distributed import Distributed
from .runtime import Runtime
from .schedule import make_scheduler
from .steps import (FitResult, _after_epoch, _epoch_line, _epoch_record, _log_skipped, _step, build_optimizer,
                    current_lr, make_criterion)


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
    return config.fixed_training_views and hasattr(model, "forward_head") and only_head_trains(model, trainable)


def model_fingerprint(model: torch.nn.Module, arch: str, runtime: Runtime) -> str:
    """What the features depend on: the frozen weights' values and how they are computed."""
    head = set(classifier_names(model))
    frozen = {k: v for k, v in model.state_dict().items() if k not in head}
    return f"{arch}|{runtime.precision}|cl={runtime.channels_last}|{fingerprint_tensors(frozen)}"


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


def _cached_val_views(cache, val_set, forward, config, data_config, runtime, reporter, name: str = "val",
                      dist: Distributed | None = None) -> tuple[list[CachedFeatures], torch.Tensor]:
    """The validation split's view (and its mirror image, with --tta), and the rows readable in all."""
    views = [_cached(cache, name, val_set, eval_transform(data_config), forward, config, runtime, reporter,
                     dist=dist)]
    if config.tta:
        views.append(_cached(cache, f"{name}-mirror", val_set, mirrored_eval_transform(data_config), forward, config,
                             runtime, reporter, dist=dist))
    return views, torch.nonzero(torch.stack([v.valid for v in views]).all(0)).flatten()


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
    vals, val_rows = _cached_val_views(cache, splits["val"], run_prefix, config, data_config, runtime, reporter,
                                       "val-boundary")
    val_labels = vals[0].labels[val_rows]
    result.skipped = sorted(dict([s for v in views + vals for s in v.skipped]).items())
    _log_skipped(reporter, result.skipped, {})
    rows = torch.nonzero(torch.stack([v.valid for v in views]).all(0)).flatten()
    labels = views[0].labels[rows]
    n = len(rows)

    def run_tail(x):
        return model.forward_head(tail(x))

    val_seconds = 0.0

    def tail_logits():
        model.eval()
        with torch.inference_mode(), runtime.autocast():
            per_view = [torch.cat([run_tail(runtime.inputs(v.features[val_rows[i:i + 64]])).float().cpu()
                                   for i in range(0, len(val_rows), 64)]) for v in vals] if len(val_rows) else []
        return combine_views(per_view) if per_view else torch.empty(0)

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
                check()
                idx = torch.as_tensor([i for _, i in keys])
                view = torch.randint(len(views), (len(idx),), generator=view_choice) if len(views) > 1 else None
                source = rows[idx]
                x = torch.stack([views[int(v)].features[r] for v, r in zip(view, source)]) if view is not None \
                    else views[0].features[source]
                y = labels[idx].to(runtime.device)
                logits, loss = _step(run_tail, runtime.inputs(x), y, criterion, optimizer, scheduler, runtime,
                                     scaler)
                step += 1
                log.step(step, loss, current_lr(optimizer))
                total_loss += loss * len(y)
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
                bar.update(len(y))
        record = _epoch_record(epoch, optimizer, total_loss, correct, count, epoch_start)
        eval_start = time.perf_counter()
        val_logits = tail_logits()
        val_seconds += time.perf_counter() - eval_start
        if len(val_rows):
            record["val_top1"] = float((val_logits.argmax(1) == val_labels).float().mean())
        result.history.append(record)
        reporter.info(_epoch_line(record, config.epochs))
        _after_epoch(log, record, model, runtime, step)
    result.images_processed = n * config.epochs
    val_extraction = sum(v.seconds for v in vals)
    result.seconds = time.perf_counter() - start - val_extraction - val_seconds
    result.val_logits, result.val_labels = val_logits, val_labels
    result.val_seconds = val_extraction + val_seconds / max(config.epochs, 1)
    return result


class _FullBatchLogistic:
    """--optimizer lbfgs: the head as an L2-regularised logistic regression fitted on all cached
    features at once (as scikit-learn's LogisticRegression and CLIP's linear probes do), with
    L-BFGS and a strong-Wolfe line search. One "epoch" is one L-BFGS step of up to 20 iterations.
    The penalty is weight_decay/2 x |W|^2 on the mean loss (biases are not penalised)."""

    def __init__(self, head, feats, labels, criterion, config):
        self.head, self.criterion, self.penalty = head, criterion, config.weight_decay
        self.x = feats.reshape(-1, feats.shape[-1])  # every stored view is a sample
        self.y = labels.repeat(feats.shape[0])
        self.views = feats.shape[0]
        self.optimizer = torch.optim.LBFGS(head.parameters(), lr=config.resolved_lr(), max_iter=20,
                                           history_size=20, line_search_fn="strong_wolfe")

    def _loss(self):
        loss = self.criterion(self.head(self.x), self.y)
        return loss + 0.5 * self.penalty * self.head.weight.pow(2).sum()

    def step(self) -> tuple[float, int]:
        """One L-BFGS step; the mean loss and the correct count over the training images after it."""
        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss()
            loss.backward()
            return loss

        self.optimizer.step(closure)
        with torch.no_grad():
            logits = self.head(self.x)
            loss = float(self.criterion(logits, self.y))
        return loss, int((logits.argmax(1) == self.y).sum()) // self.views


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
    vals, val_rows = _cached_val_views(cache, splits["val"], forward, config, data_config, runtime, reporter,
                                       dist=dist)
    result.skipped = sorted(dict([s for v in views + vals for s in v.skipped]).items())
    _log_skipped(reporter, result.skipped, {})

    valid = torch.stack([v.valid for v in views]).all(0)
    rows = torch.nonzero(valid).flatten()
    feats = torch.stack([v.features[rows] for v in views]).to(runtime.device)  # [views, n, dim]
    labels = views[0].labels[rows].to(runtime.device)
    val_feats = [v.features[val_rows].to(runtime.device) for v in vals]
    val_labels = vals[0].labels[val_rows].to(runtime.device)

    head = model.get_classifier()
    drop_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    n = len(labels)
    optimizer, batches, view_choice, scheduler, criterion = _cached_training_plan(
        model, config, labels, len(train_set.class_ids), runtime.device)
    full_batch = _FullBatchLogistic(head, feats, labels, criterion, config) if config.optimizer == "lbfgs" else None
    if full_batch is not None:
        optimizer = full_batch.optimizer
    train_start, step = time.perf_counter(), 0
    with reporter.bar(config.epochs, "training head", unit="epoch") as bar:
        for epoch in range(config.epochs):
            check()
            epoch_start = time.perf_counter()
            head.train()
            total_loss, correct = 0.0, 0
            if full_batch is not None:
                loss, correct = full_batch.step()
                total_loss = loss * n
                step += 1
                log.step(step, loss, current_lr(optimizer))
            else:
                batches.set_epoch(epoch)
                for keys in batches:
                    check()
                    idx = torch.as_tensor([i for _, i in keys])
                    view = torch.randint(len(views), (len(idx),), generator=view_choice) if len(views) > 1 else 0
                    x, y = feats[view, idx], labels[idx]
                    if drop_rate:
                        x = F.dropout(x, drop_rate, training=True)
                    logits, loss = _step(head, x, y, criterion, optimizer, scheduler)
                    step += 1
                    log.step(step, loss, current_lr(optimizer))
                    total_loss += loss * len(y)
                    correct += int((logits.argmax(1) == y).sum())
            head.eval()
            with torch.inference_mode():
                val_logits = combine_views([head(f) for f in val_feats])
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
    val_extraction = sum(v.seconds for v in vals)
    result.seconds = time.perf_counter() - start - val_extraction  # validation features belong to evaluation
    reporter.info(f"trained the head for {config.epochs} epochs in {time.perf_counter() - train_start:.1f}s "
                  f"on cached features ({len(views)} view{'s' if len(views) > 1 else ''})")
    result.val_logits, result.val_labels, result.val_seconds = val_logits.cpu(), val_labels.cpu(), val_extraction
    return result
