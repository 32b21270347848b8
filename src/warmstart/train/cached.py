"""Cached inputs: the frozen part's outputs for every view of a run's splits (computed once per
image and view, through one loader, into the self-verifying feature cache), and epochs of
batches drawn from them. The training loops on them are in `head.py`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import seeds
from ..data.feature_cache import CachedFeatures, FeatureCache, View
from ..data.fingerprint import fingerprint_tensors
from ..data.loaders import EpochBatches, seeded_generator
from ..data.transforms import eval_transform, mirrored_eval_transform, train_transform
from ..models.outputs import PreLogits, architecture, backbone_fingerprint
from ..stop import check
from ..compute.runtime import Runtime
from .session import Session
from .steps import FitResult, log_skipped


def frozen_features(model: torch.nn.Module, arch: str, runtime: Runtime, input_size, say=None,
                    images: int | None = None) -> tuple:
    """(forward, fingerprint): the model's pooled features (the classifier's input) computed by the
    run's engine, and what they depend on (the frozen weights' values and how they are computed,
    the engine included: the feature cache never mixes rows of two engines). `images`: how many
    it may compute (Runtime.frozen: a graph is exported where they repay it)."""
    return _frozen(PreLogits(model), f"{architecture(model)} pooled features", backbone_fingerprint(model), arch,
                   runtime, input_size, say, images)


def frozen_prefix(prefix: torch.nn.Module, arch: str, runtime: Runtime, input_size, say=None,
                  images: int | None = None) -> tuple:
    """(forward, fingerprint) of the frozen prefix's activations (--cache-boundary), as `frozen_features`."""
    return _frozen(prefix, f"{arch} prefix of {len(prefix)} segments", fingerprint_tensors(prefix.state_dict()),
                   f"{arch}|prefix={len(prefix)}", runtime, input_size, say, images)


def passes(session: Session, splits: dict) -> int:
    """How many images the frozen network may compute for these splits: every view of each."""
    return len(splits["train"]) * len(training_views(session)) + \
        sum(len(splits[s]) * len(validation_views(session)) for s in ("val", "test") if s in splits)


def _frozen(module, name: str, weights: str, key: str, runtime: Runtime, input_size, say, images=None) -> tuple:
    forward = runtime.frozen(module, name, weights, input_size, say, images)
    return forward, f"{key}|{runtime.precision}|cl={runtime.channels_last}|{forward.engine}|{weights}"


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
        outs = cache.features_of(requests, forward, session.runtime, max(config.batch_size, 64), config.workers,
                                 progress=bar.update)
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
                                                       shard(r)[0], forward, session.runtime, session.config.batch_size,
                                                       0)
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
        train_views = [(v, splits["train"]) for v in training_views(session, "train" + suffix)
                       if session.config.epochs or include_val]  # --epochs 0: nothing trains on them
        views = training_views if include_val else validation_views
        val_views = [(v, splits["val"]) for v in views(session, "val" + suffix)]
        outs = cached_views(cache, train_views + val_views, forward, session)  # one loader for them all
        train, val = outs[:len(train_views)], outs[len(train_views):]
        if include_val:
            train, val = [_concat(t, m) for t, m in zip(train, val)], []
        if result is not None:
            result.feature_seconds = sum(v.seconds for v in train)
            result.images_extracted = sum(v.computed for v in train)
            result.features_from_cache = not any(v.computed for v in train)
            result.skipped = sorted(dict([s for v in train + val for s in v.skipped]).items())
            log_skipped(session.reporter, result.skipped, {})
        return cls(train, val, *(torch.nonzero(torch.stack([v.valid for v in views]).all(0)).flatten()
                                 if views else torch.zeros(0, dtype=torch.long) for views in (train, val)))

    @property
    def labels(self) -> torch.Tensor:
        return self.train[0].labels[self.rows] if self.train else torch.zeros(0, dtype=torch.long)

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


GATHER_BYTES = 64 << 20  # rows gathered at once from the cached views (a chunk of an epoch's batches)


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
        """Batches gathered a chunk of batches at a time (up to GATHER_BYTES of rows): one gather per
        view and chunk rather than per batch, the same rows and view choices as batch by batch (the
        generator's draws are consumed in the same order)."""
        self.sampler.set_epoch(self.epoch)
        batches = [[i for _, i in keys] for keys in self.sampler]
        row_bytes = self.views[0][0].numel() * self.views[0].element_size() if len(self.views[0]) else 1
        per_chunk = max(1, GATHER_BYTES // max(1, row_bytes * max((len(b) for b in batches), default=1)))
        for first in range(0, len(batches), per_chunk):
            chunk = batches[first:first + per_chunk]
            idx = torch.as_tensor([i for batch in chunk for i in batch], dtype=torch.long)
            source = idx if self.rows is None else self.rows[idx]
            x = self.views[0][source]
            if len(self.views) > 1:  # one gather per view, not one copy per image
                view = torch.randint(len(self.views), (len(idx),), generator=self.view_choice)
                for v in range(1, len(self.views)):
                    chosen = torch.nonzero(view == v).flatten()
                    if len(chosen):
                        x[chosen.to(x.device)] = self.views[v][source[chosen]].to(x.device)
            y = self.labels[idx]
            start = 0
            for batch in chunk:
                check()
                end = start + len(batch)
                yield self.to_input(x[start:end]), y[start:end], y[start:end]
                start = end
        self.epoch += 1
