"""The run config: the single source of truth for a training run.

The CLI, YAML config files and the Python API all produce a `RunConfig`; every run
saves it, resolved, as `config.yaml` in its run directory, and
`warmstart train --config RUN/config.yaml` re-runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

STRATEGIES = ("feature-extractor", "partial", "fine-tune")
OPTIMIZERS = ("sgd", "adamw", "lbfgs")
SCHEDULES = ("cosine", "piecewise", "constant")
AUGMENTS = ("standard", "none")
BALANCES = ("none", "sampler", "loss")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RunConfig:
    # a named preset (see warmstart.recipes); settings given explicitly override it
    recipe: str | None = None
    # what to train on
    data: str = ""
    val_data: str | None = None
    val_fraction: float = 0.2
    # Stanford Dogs: train and evaluate on the annotated dog box (the largest, where several)
    crop_to_box: bool = False
    drop_empty_classes: bool = False
    # CSV manifests: image paths outside the manifest's folder are refused unless this is set
    allow_outside_paths: bool = False
    # class imbalance: class-balanced sampling, or class-weighted loss
    balance: str = "none"
    # the network and where its weights come from
    model: str = "efficientnet_lite0"
    weights: str = "bundled"
    skip: list[str] = field(default_factory=list)
    # how far the model may move from its pretrained state
    strategy: str = "feature-extractor"
    trainable: list[str] = field(default_factory=list)
    unfreeze_last: int | None = None
    # gradual unfreezing: "EPOCH:N" trains the last N stages (or "EPOCH:all" everything) from that epoch on
    unfreeze_schedule: list[str] = field(default_factory=list)
    # preprocessing (None: from the model's pretrained config)
    input_size: int | None = None
    input_scale: float | None = None  # or the pretrained size x this (train and evaluate larger)
    crop_pct: float | None = None
    augment: str = "standard"
    # optimisation
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    piecewise_boundaries: list[float] = field(default_factory=list)
    piecewise_lr_decay: list[float] = field(default_factory=list)
    label_smoothing: float = 0.0
    # discriminative learning rates: lr x layer_decay^depth-from-the-top, and the new head's own rate
    layer_decay: float | None = None
    head_lr: float | None = None
    # regularisation (mixup/cutmix alphas, 0 = off) and an exponential moving average of the weights
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.0
    # evaluate on the image and its mirror image (average of the probabilities)
    tta: bool = False
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    workers: int | None = None
    # speed: when only the head trains, run the frozen backbone once per image (and view) and
    # keep its features on disk (the run's cache/ folder, or a --cache-dir shared by runs)
    feature_cache: bool = True
    cache_dir: str | None = None
    cache_views: int = 1  # with --augment standard: K stored views per image (view 0 un-augmented)
    image_cache: bool = False  # decode each image once into a pre-resized uint8 store
    # --strategy partial: cache the frozen prefix's activations, run only the trainable tail per epoch
    cache_boundary: bool = False
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    # torchrun: SyncBatchNorm across GPUs
    sync_bn: bool = False
    # checkpoints (whole-model training): every epoch, and every N optimizer steps
    checkpoint_every: int = 0
    # output
    out: str | None = None
    quiet: bool = False

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        known = {f.name for f in fields(cls)}
        normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalized) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; "
                f"valid settings are the long option names of 'warmstart train --help'"
            )
        normalized = {k: _coerce(k, v, source) for k, v in normalized.items()}
        if normalized.get("recipe") is not None:
            from .recipes import recipe_settings

            normalized = {**recipe_settings(normalized["recipe"]), **normalized}
        return cls(**normalized).validated()

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist: pass the path of a YAML run config")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML ({exc.__class__.__name__}): fix its syntax")
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of setting: value")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(path))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes).validated()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # -- validation ----------------------------------------------------------------
    def validated(self) -> "RunConfig":
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {value!r} is not valid: use one of {', '.join(allowed)}")

        def positive(name: str, value: float, allow_zero: bool = False) -> None:
            if value is None:
                return
            if value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise UserError(f"--{name.replace('_', '-')} {value} is not valid: it must be {bound}")

        # lists may come from YAML as scalars
        for name in ("skip", "trainable", "piecewise_boundaries", "piecewise_lr_decay", "unfreeze_schedule"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, [])
            elif not isinstance(value, list):
                setattr(self, name, [value])
        choice("strategy", STRATEGIES)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("augment", AUGMENTS)
        choice("balance", BALANCES)
        choice("precision", PRECISIONS)
        positive("cache_views", self.cache_views)
        positive("checkpoint_every", self.checkpoint_every, allow_zero=True)
        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, allow_zero=True)
        positive("momentum", self.momentum, allow_zero=True)
        positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        positive("input_size", self.input_size)
        positive("input_scale", self.input_scale)
        positive("workers", self.workers, allow_zero=True)
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction} is not valid: it must be between 0 and 1")
        positive("head_lr", self.head_lr)
        positive("mixup", self.mixup, allow_zero=True)
        positive("cutmix", self.cutmix, allow_zero=True)
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer-decay {self.layer_decay} is not valid: it must be in (0, 1], e.g. 0.7")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay {self.ema_decay} is not valid: it must be in [0, 1), e.g. 0.999 (0 = off)")
        if (self.mixup or self.cutmix) and self.balance == "loss":
            raise UserError("--mixup/--cutmix do not combine with --balance loss: use --balance sampler")
        self.unfreeze_schedule = [str(step) for step in self.unfreeze_schedule]
        if self.unfreeze_schedule:
            from .models.unfreeze import parse_unfreeze_schedule

            parse_unfreeze_schedule(self.unfreeze_schedule)
            if self.strategy == "fine-tune":
                raise UserError("--unfreeze-schedule starts from a frozen backbone: use --strategy feature-extractor "
                                "or partial with it, not fine-tune")
        if self.optimizer == "lbfgs" and not (self.head_only and self.fixed_training_views
                                              and self.balance != "sampler"):
            raise UserError("--optimizer lbfgs fits the head on all cached features at once: use it with --strategy "
                            "feature-extractor, the feature cache, --augment none (or --cache-views K) and no "
                            "--balance sampler, --mixup, --cutmix or --ema-decay")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing {self.label_smoothing} is not valid: it must be in [0, 1)")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise UserError(f"--crop-pct {self.crop_pct} is not valid: it must be in (0, 1]")
        if self.strategy == "partial":
            if not self.trainable and self.unfreeze_last is None:
                raise UserError("--strategy partial needs --trainable PATTERN or --unfreeze-last N: say what trains")
            positive("unfreeze_last", self.unfreeze_last)
        elif self.trainable or self.unfreeze_last is not None:
            raise UserError(
                f"--trainable/--unfreeze-last only apply to --strategy partial (got --strategy {self.strategy})"
            )
        if self.schedule == "piecewise":
            self.piecewise_boundaries = [float(b) for b in self.piecewise_boundaries]
            self.piecewise_lr_decay = [float(d) for d in self.piecewise_lr_decay]
            bounds = self.piecewise_boundaries
            if bounds != sorted(bounds) or any(b <= 0 for b in bounds):
                raise UserError(f"--piecewise-boundaries {bounds} must be increasing epochs > 0")
            if len(self.piecewise_lr_decay) != len(bounds) + 1:
                raise UserError(
                    f"--piecewise-lr-decay needs one factor per piece: {len(bounds) + 1} for "
                    f"{len(bounds)} boundaries, got {len(self.piecewise_lr_decay)}"
                )
        return self

    # -- derived values -------------------------------------------------------------
    @property
    def head_only(self) -> bool:
        return self.strategy == "feature-extractor" and not self.unfreeze_schedule

    @property
    def needs_image_batches(self) -> bool:
        """Settings that act on every image batch: no training on cached features or activations."""
        return bool(self.unfreeze_schedule or self.mixup or self.cutmix or self.ema_decay)

    @property
    def fixed_training_views(self) -> bool:
        """The frozen part's outputs can be cached: the cache is on, the training views are fixed
        (un-augmented, or K stored augmented views) and nothing needs the image batches."""
        return (self.feature_cache and (self.augment == "none" or self.cache_views > 1)
                and not self.needs_image_batches)

    def resolved_lr(self) -> float:
        """Default learning rates (the demo's 0.1 diverges on unnormalised pooled features)."""
        if self.lr is not None:
            return self.lr
        if self.optimizer == "lbfgs":
            return 1.0  # the line search scales each step
        if self.optimizer == "sgd":
            return 0.01
        return 1e-3 if self.head_only else 1e-4


def _field_kind(name: str) -> tuple[str, bool, bool]:
    """(scalar type name, is a list, may be None) from the field's annotation, e.g. 'float | None'."""
    annotation = {f.name: f.type for f in fields(RunConfig)}[name].replace(" ", "")
    optional = "|None" in annotation
    annotation = annotation.replace("|None", "")
    if annotation.startswith("list["):
        return annotation[5:-1], True, optional
    return annotation, False, optional


def _coerce(name: str, value: Any, source: str) -> Any:
    """A value from YAML or Python in the field's type: numbers written as text ('1e-3', which
    YAML 1.1 reads as a string) become numbers; any other mismatch is one line naming the key."""
    kind, is_list, optional = _field_kind(name)
    if value is None:
        return [] if is_list else value
    if is_list:
        return [_coerce_scalar(name, v, kind, source) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return _coerce_scalar(name, value, kind, source)


def _coerce_scalar(name: str, value: Any, kind: str, source: str) -> Any:
    def wrong() -> UserError:
        expected = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "text"}[kind]
        return UserError(f"{source}: {name}: {value!r} is not valid: expected {expected} ({kind})")

    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise wrong()
    if kind == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong()
    if isinstance(value, bool):
        raise wrong()
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise wrong() from None
    if not isinstance(number, (int, float)) or number != number:  # NaN
        raise wrong()
    if kind == "int":
        if float(number) != int(number):
            raise wrong()
        return int(number)
    return float(number)
