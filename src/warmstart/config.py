"""The run config: the single source of truth for a training run.

The CLI, YAML config files and the Python API all produce a `RunConfig`; every run
saves it, resolved, as `config.yaml` in its run directory, and
`warmstart train --config RUN/config.yaml` re-runs it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, excerpt
from .files import load_yaml
from .recipes import RECIPES

CALIBRATION_FITS = ("auto", "val", "cross-fit")  # train/cross_fit.py
ENGINES = ("auto", "torch", "onnxruntime")  # compute/engine.py computes with them

STRATEGIES = ("feature-extractor", "partial", "fine-tune")
OPTIMIZERS = ("sgd", "adamw", "lbfgs")
SCHEDULES = ("cosine", "piecewise", "constant")
AUGMENTS = ("standard", "none")
BALANCES = ("none", "sampler", "loss")
PRECISIONS = ("fp32", "bf16", "fp16")
PIPELINES = ("auto", "cpu", "gpu")
HEAD_INITS = ("auto", "pretrained", "zero")
# the command line's option groups, in the order `--help` shows them
GROUPS = ("run", "data", "model and weights", "optimisation", "speed", "output", "several processes (torchrun)")


def setting(default: Any = None, help: str = "", *, group: str, choices: tuple | None = None,
            metavar: str | None = None, repeat: bool = False, bounds: str | None = None, tunable: bool = True):
    """A setting, declared once: its default, and what the command line and the checks need (help,
    option group, choices, metavar, `repeat` for a list given one flag at a time instead of as
    several values, `bounds` as an interval such as "(0, inf)" or "[0, 1)", `tunable=False` for run
    settings a hyper-parameter search must not draw). A default of `...` makes it a command's
    positional argument (it must be given). A bool gets `--NAME` and `--no-NAME`. RunConfig declares the run's; ServeSettings and StudyOptions
    declare theirs the same way (`check_declared` checks any of them)."""
    metadata = {"help": help, "group": group, "choices": choices, "metavar": metavar, "repeat": repeat,
                "bounds": bounds, "tunable": tunable, "positional": default is ...}
    if default is ...:
        return field(metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_declared(settings) -> None:
    """Every field of a dataclass of settings against its declaration: choices and bounds."""
    for f in fields(settings):
        if "bounds" in f.metadata:
            _check_declared(f, getattr(settings, f.name))


@dataclass
class RunConfig:
    recipe: str | None = setting(None, "a preset of settings (see 'warmstart recipes'); flags and the config "
                                 "file override it", group="run", choices=tuple(RECIPES))
    # what to train on
    data: str = setting("", "ROOT with train/ and val/ or test/ class folders, ROOT/<class>/*, a CSV manifest "
                        "(image_path,label), WebDataset shards ('train-{000000..000009}.tar', a folder of them or "
                        "their dataset.yaml), or hf:PATH (a Hugging Face dataset)", group="data", tunable=False)
    val_data: str | None = setting(None, "separate validation data (folder tree or CSV)", group="data", tunable=False)
    exclude: str | None = setting(None, "leave out the photos FILE lists (one path a line, or an audit's "
                                  "label_issues.csv, outliers.csv or duplicates.csv)", group="data", tunable=False)
    val_fraction: float = setting(0.2, "held-out fraction when there is no val/ split (seeded, stratified; default "
                                  "0.2; 0: no validation, the last epoch is kept)", group="data", bounds="[0, 1)")
    crop_to_box: bool = setting(False, "Stanford Dogs: train and evaluate on the annotated dog box (the largest, "
                                "where several)", group="data", tunable=False)
    drop_empty_classes: bool = setting(False, "leave out class folders without images instead of stopping",
                                       group="data", tunable=False)
    allow_outside_paths: bool = setting(False, "CSV manifests: read image paths outside the manifest's folder "
                                        "(refused by default)", group="data", tunable=False)
    image_column: str | None = setting(None, "Hugging Face datasets (--data hf:PATH): the column of images, where "
                                       "it is not the Image feature", group="data", tunable=False)
    label_column: str | None = setting(None, "Hugging Face datasets: the column of labels, where it is not the "
                                       "ClassLabel feature or one named label/class", group="data", tunable=False)
    shuffle_buffer: int = setting(5000, "WebDataset shards: the training order is the shards in a seeded order, "
                                  "each read through, mixed by a seeded buffer of this many samples (default 5000)",
                                  group="data", bounds="[1, inf)", tunable=False)
    balance: str = setting("none", "class imbalance: none (default), sampler (class-balanced sampling), loss "
                           "(class weights)", group="data", choices=BALANCES)
    # the network and where its weights come from
    model: str = setting("efficientnet_lite0", "timm name or resnet50, resnet_v2_50, inception_v4, nasnet_a_large, "
                         "efficientnet_lite0 (default), efficientnet_lite1, efficientnet_lite2",
                         group="model and weights")
    weights: str = setting("bundled", "bundled (offline EfficientNet-Lite0, default; Lite1/Lite2 with "
                           "warmstart[zoo]), hub, none, or a .safetensors/.pth file", group="model and weights")
    skip: list[str] = setting([], "parameter-name pattern not to restore (repeatable); the old classifier is "
                              "skipped by default when the class count differs", group="model and weights",
                              metavar="PATTERN", repeat=True)
    # the new head's start: the old classifier's rows for the classes it knows (matched by WordNet
    # id or name), pulled back toward them while training (L2-SP)
    head_init: str = setting("auto", "the new head's start: auto (default: the pretrained classifier's rows for the "
                             "classes it knows, when any class matches), pretrained (the same, required), zero",
                             group="model and weights", choices=HEAD_INITS)
    head_prior: float = setting(30.0, "how strongly rows started from the pretrained classifier are pulled back to "
                                "it (L2-SP: STRENGTH/2 x their squared distance from the start, on the loss summed "
                                "over the training images; at most 10000: a stronger pull swamps the loss)",
                                group="model and weights", metavar="STRENGTH", bounds="[0, 10000]")
    head_teacher: float = setting(0.0, "with --optimizer lbfgs: the share of each training photo's target taken "
                                  "from the pretrained classifier's softened prediction (distillation, temperature 4) "
                                  "among the classes it knows; 0 (default) trains on the labels alone",
                                  group="model and weights", metavar="SHARE", bounds="[0, 1]")
    pretrained_labels: str | None = setting(None, "the label set of the weights' classifier: imagenet-1k, "
                                            "imagenet-12k, imagenet-22k, imagenet-21k-goog, … or a FILE with one label "
                                            "per line (default: known for bundled and hub weights)",
                                            group="model and weights", metavar="SET|FILE", tunable=False)
    class_map: str | None = setting(None, "YAML or CSV file: class -> WordNet id, label name, or none, for classes "
                                    "the names do not match", group="model and weights", metavar="FILE",
                                    tunable=False)
    # how far the model may move from its pretrained state
    strategy: str = setting("feature-extractor", "feature-extractor (head only, default), partial, fine-tune",
                            group="model and weights", choices=STRATEGIES)
    trainable: list[str] = setting([], "with --strategy partial: parameter-name pattern that trains (repeatable)",
                                   group="model and weights", metavar="PATTERN", repeat=True)
    unfreeze_last: int | None = setting(None, "with --strategy partial: the last N stages train",
                                        group="model and weights", metavar="N", bounds="(0, inf)")
    unfreeze_schedule: list[str] = setting([], "gradual unfreezing: after EPOCH epochs the last N stages (or "
                                           "'all') train too, e.g. 1:2 3:all", group="model and weights",
                                           metavar="EPOCH:N")
    # preprocessing (None: from the model's pretrained config)
    input_size: int | None = setting(None, "input size in px (default: the model's)", group="data", bounds="[8, 2048]")
    input_scale: float | None = setting(None, "input size as FACTOR x the model's pretrained size (rounded to 32 "
                                        "px)", group="data", metavar="FACTOR", bounds="(0, 8]")
    crop_pct: float | None = setting(None, "center-crop fraction at evaluation", group="data", bounds="(0, 1]")
    augment: str = setting("standard", "standard: random-resized-crop + flip (default); none", group="data",
                           choices=AUGMENTS)
    workers: int | None = setting(None, "data loader processes (default: CPU count, max 8)", group="data",
                                  bounds="[0, inf)", tunable=False)
    # optimisation
    optimizer: str = setting("sgd", "sgd (momentum, default), adamw, or lbfgs (the head as a full-batch "
                             "logistic regression on cached features)", group="optimisation", choices=OPTIMIZERS)
    lr: float | None = setting(None, "learning rate (default: sgd 0.01; adamw 1e-3 head-only, 1e-4 otherwise)",
                               group="optimisation", bounds="(0, inf)")
    momentum: float = setting(0.9, "SGD momentum", group="optimisation", bounds="[0, inf)")
    weight_decay: float = setting(1e-4, "weight decay (not on biases and norms); with lbfgs the L2 penalty",
                                  group="optimisation", bounds="[0, inf)")
    schedule: str = setting("cosine", "cosine (default), piecewise, constant", group="optimisation",
                            choices=SCHEDULES)
    warmup_epochs: float = setting(0.0, "epochs of linear warm-up", group="optimisation", bounds="[0, inf)")
    piecewise_boundaries: list[float] = setting([], "epochs where the learning rate changes",
                                                group="optimisation", metavar="EPOCH")
    piecewise_lr_decay: list[float] = setting([], "lr multiplier of each piece (one more than the boundaries)",
                                              group="optimisation", metavar="FACTOR")
    # discriminative learning rates: lr x layer_decay^depth-from-the-top, and the new head's own rate
    head_lr: float | None = setting(None, "the new head's learning rate (default: --lr)", group="optimisation",
                                    bounds="(0, inf)")
    layer_decay: float | None = setting(None, "layer-wise lr decay: each layer below the top trains at FACTOR x "
                                        "the one above, e.g. 0.7", group="optimisation", metavar="FACTOR",
                                        bounds="(0, 1]")
    label_smoothing: float = setting(0.0, "label smoothing of the loss", group="optimisation", bounds="[0, 1)")
    # regularisation (mixup/cutmix alphas, 0 = off) and an exponential moving average of the weights
    mixup: float = setting(0.0, "mixup alpha (0: off)", group="optimisation", metavar="ALPHA", bounds="[0, inf)")
    cutmix: float = setting(0.0, "cutmix alpha (0: off)", group="optimisation", metavar="ALPHA", bounds="[0, inf)")
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights (e.g. 0.999) and use it",
                               group="optimisation", metavar="DECAY", bounds="[0, 1)")
    tta: bool = setting(False, "evaluate (and predict, serve, export) on the image and its mirror image",
                        group="optimisation")
    # LP-FT: fit the head as a logistic regression first, then train from it; keep the best epoch
    calibrate: bool = setting(True, "fit a temperature on the validation logits so that the probabilities shown "
                              "match how often the model is right (default, whenever there is validation)",
                              group="optimisation")
    calibration_fit: str = setting("auto", "where the temperature is fitted: val's logits, or cross-fit (a head on "
                                   "cached features: the out-of-fold logits of every train and val photo, 5 folds); "
                                   "auto: cross-fit for such a head when val has under 200 photos, else val",
                                   group="optimisation", choices=CALIBRATION_FITS)
    probe_first: bool = setting(False, "before training the network, fit the new head as a logistic regression "
                                "on the frozen network's features (LP-FT)", group="optimisation")
    keep_best: bool = setting(False, "keep the epoch with the best val top-1 (raw or EMA weights, or the probe "
                              "it started from) instead of the last", group="optimisation")
    refit: bool = setting(False, "when validation was carved from train: after the run chose its settings on it, "
                          "train again on train + val with them for the saved model", group="optimisation")
    epochs: int = setting(10, "training epochs (0: the head as it starts, e.g. the pretrained classifier alone)",
                          group="optimisation", bounds="[0, inf)")
    batch_size: int = setting(32, "batch size (per GPU/process)", group="optimisation", bounds="(0, inf)")
    seed: int = setting(0, "random seed (runs are reproducible on the CPU)", group="optimisation")
    # speed: when only the head trains, run the frozen backbone once per image (and view) and
    # keep its features on disk (the run's cache/ folder, or a --cache-dir shared by runs)
    feature_cache: bool = setting(True, "run the frozen part once per image and keep its outputs on disk, when "
                                  "they can be (default; --no-feature-cache: run it every epoch)", group="speed")
    cache_dir: str | None = setting(None, "feature/image cache folder shared by runs (default: the run's cache/)",
                                    group="speed", tunable=False)
    cache_views: int = setting(1, "with --augment standard and a frozen backbone: cache K views per image (view 0 "
                               "un-augmented) and sample among them each epoch", group="speed", metavar="K",
                               bounds="(0, inf)")
    image_cache: bool = setting(False, "decode each image once into a pre-resized uint8 store (faster epochs)",
                                group="speed")
    cache_boundary: bool = setting(False, "with --strategy partial and un-augmented (or --cache-views) training: "
                                   "cache the frozen prefix's activations once and run only the trainable tail "
                                   "each epoch", group="speed")
    pipeline: str = setting("auto", "where images are decoded and augmented: gpu (loader workers only read; a "
                            "batch at a time on the GPU), cpu (each image in a loader worker), auto (default: gpu "
                            "on a CUDA device, else cpu)", group="speed", choices=PIPELINES)
    precision: str = setting("fp32", "fp32 (default), bf16 (autocast; fast on recent CPUs and GPUs), fp16 (GPU)",
                             group="speed", choices=PRECISIONS)
    channels_last: bool = setting(True, "channels_last memory format (default, usually faster; "
                                  "--no-channels-last: NCHW)", group="speed")
    compile: bool = setting(False, "torch.compile the model", group="speed")
    engine: str = setting("auto", "what computes the frozen network (extraction, eval, predict, report, audit, "
                          "serve): onnxruntime (CPU, fp32), torch, or auto (default: onnxruntime on a CPU in fp32, "
                          "else torch); training always runs in PyTorch", group="speed", choices=ENGINES,
                          tunable=False)
    # torchrun: SyncBatchNorm across GPUs
    sync_bn: bool = setting(False, "synchronise BatchNorm across GPUs", group="several processes (torchrun)")
    # checkpoints (whole-model training): every epoch, and every N optimizer steps
    checkpoint_every: int = setting(0, "also checkpoint every STEPS optimizer steps (checkpoints are written every "
                                    "epoch)", group="output", metavar="STEPS", bounds="[0, inf)")
    # output
    out: str | None = setting(None, "run directory (default runs/<timestamp>-<model>)", group="output", tunable=False)
    quiet: bool = setting(False, "log lines instead of progress bars", group="output", tunable=False)
    # the settings given explicitly (the rest may come from the recipe); not a setting itself
    given: InitVar[tuple | None] = None

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
        declared = {f.name: f for f in fields(cls)}
        normalized = {k: _coerce(declared[k], v, source) for k, v in normalized.items()}
        return cls(**normalized, given=tuple(normalized)).validated()

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist: pass the path of a YAML run config")
        try:
            values = load_yaml(path.read_text(), f"config file {path}") or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML ({exc.__class__.__name__}): fix its syntax")
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of setting: value")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(path))

    def __post_init__(self, given: tuple | None) -> None:
        """A recipe fills in every setting not given (`given`: the names passed to the constructor,
        from_dict or replace; None, e.g. from a subclass's own __init__: those at their defaults)."""
        if self.recipe is None:
            return
        from .recipes import recipe_settings

        declared = {f.name: f for f in fields(self)}
        for name, value in recipe_settings(self.recipe).items():
            f = declared[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if (name not in given) if given is not None else getattr(self, name) == default:
                setattr(self, name, value)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with `changes`; every setting counts as given (the recipe was applied already)."""
        return dataclasses.replace(self, **changes, given=tuple(f.name for f in fields(self))).validated()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # -- validation ----------------------------------------------------------------
    def validated(self) -> "RunConfig":
        for f in fields(self):  # lists may come from YAML or Python as scalars
            if field_kind(f)[1] and not isinstance(getattr(self, f.name), list):
                value = getattr(self, f.name)
                setattr(self, f.name, [] if value is None else [value])
        check_declared(self)
        self.unfreeze_schedule = [str(step) for step in self.unfreeze_schedule]
        self._check_combinations()
        return self

    def _check_combinations(self) -> None:
        """Rules between settings (each setting's own choices and bounds come from its declaration)."""
        if self.cache_dir and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise UserError(f"--cache-dir {self.cache_dir} is a file: pass a folder (it is created if missing)")
        if (self.mixup or self.cutmix) and self.balance == "loss":
            raise UserError("--mixup/--cutmix do not combine with --balance loss: use --balance sampler")
        if self.unfreeze_schedule:
            from .models.unfreeze import parse_unfreeze_schedule

            parse_unfreeze_schedule(self.unfreeze_schedule)
            if self.strategy == "fine-tune":
                raise UserError("--unfreeze-schedule starts from a frozen backbone: use --strategy feature-extractor "
                                "or partial with it, not fine-tune")
        if self.probe_first and self.head_only:
            raise UserError("--probe-first fits the head before the network trains: use it with --strategy "
                            "fine-tune or partial (--recipe linear-probe is the probe alone)")
        if self.optimizer == "lbfgs" and not (self.head_only and self.caching_ruled_out_by() is None
                                              and self.balance != "sampler"):
            raise UserError("--optimizer lbfgs fits the head on all cached features at once: use it with --strategy "
                            "feature-extractor, the feature cache, --augment none (or --cache-views K) and no "
                            "--balance sampler, --mixup, --cutmix or --ema-decay")
        if self.head_teacher and self.optimizer != "lbfgs":
            raise UserError(f"--head-teacher {self.head_teacher} distils the pretrained classifier into the "
                            f"logistic probe: use it with --optimizer lbfgs (as --recipe best does), or set it to 0")
        if self.strategy == "partial":
            if not self.trainable and self.unfreeze_last is None:
                raise UserError("--strategy partial needs --trainable PATTERN or --unfreeze-last N: say what trains")
        elif self.trainable or self.unfreeze_last is not None:
            raise UserError(
                f"--trainable/--unfreeze-last only apply to --strategy partial (got --strategy {self.strategy})"
            )
        if self.schedule == "piecewise":
            bounds = self.piecewise_boundaries
            if bounds != sorted(bounds) or any(b <= 0 for b in bounds):
                raise UserError(f"--piecewise-boundaries {bounds} must be increasing epochs > 0")
            if len(self.piecewise_lr_decay) != len(bounds) + 1:
                raise UserError(
                    f"--piecewise-lr-decay needs one factor per piece: {len(bounds) + 1} for "
                    f"{len(bounds)} boundaries, got {len(self.piecewise_lr_decay)}"
                )

    # -- derived values -------------------------------------------------------------
    @property
    def head_only(self) -> bool:
        return self.strategy == "feature-extractor" and not self.unfreeze_schedule

    @property
    def needs_image_batches(self) -> bool:
        """Settings that act on every image batch: no training on cached features or activations."""
        return bool(self.unfreeze_schedule or self.mixup or self.cutmix or self.ema_decay)

    def caching_ruled_out_by(self) -> str | None:
        """Why these settings rule out training on the frozen part's cached outputs (None: they
        allow it: the cache is on, the training views are fixed, nothing needs the image batches).
        The model's side of the decision is `warmstart.train.paths.choose_training_path`."""
        if not self.feature_cache:
            return "--no-feature-cache"
        if self.augment != "none" and self.cache_views <= 1:
            return "a fresh augmentation every epoch (--augment standard without --cache-views K)"
        if self.needs_image_batches:
            return "--unfreeze-schedule, --mixup, --cutmix or --ema-decay act on every image batch"
        return None

    def resolved_lr(self) -> float:
        """Default learning rates (the demo's 0.1 diverges on unnormalised pooled features)."""
        if self.lr is not None:
            return self.lr
        if self.optimizer == "lbfgs":
            return 1.0  # the line search scales each step
        if self.optimizer == "sgd":
            return 0.01
        return 1e-3 if self.head_only else 1e-4


def field_kind(f) -> tuple[str, bool, bool]:
    """(scalar type name, is a list, may be None) from a field's annotation, e.g. 'float | None'."""
    declared = f.type
    if not isinstance(declared, str):  # a class declared without `from __future__ import annotations`
        declared = declared.__name__ if isinstance(declared, type) else str(declared)
    annotation = declared.replace(" ", "")
    optional = "|None" in annotation
    annotation = annotation.replace("|None", "")
    if annotation.startswith("list["):
        return annotation[5:-1], True, optional
    return annotation, False, optional


def _coerce(f, value: Any, source: str) -> Any:
    """A value from YAML or Python in the field's type: numbers written as text ('1e-3', which
    YAML 1.1 reads as a string) become numbers; any other mismatch is one line naming the key."""
    name = f.name
    kind, is_list, optional = field_kind(f)
    if value is None:
        return [] if is_list else value
    if is_list:
        return [_coerce_scalar(name, v, kind, source) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return _coerce_scalar(name, value, kind, source)


def _coerce_scalar(name: str, value: Any, kind: str, source: str) -> Any:
    def wrong() -> UserError:
        expected = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "text"}[kind]
        return UserError(f"{source}: {name}: {excerpt(value)} is not valid: expected {expected} ({kind})")

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


def _recording_given(init):
    """RunConfig(...) notes which settings were passed, so that its recipe fills in only the rest."""
    names = [f.name for f in fields(RunConfig)]

    @functools.wraps(init)  # the same signature for help() and editors
    def __init__(self, *args, given: tuple | None = None, **kwargs):
        init(self, *args, given=tuple(names[:len(args)]) + tuple(kwargs) if given is None else given, **kwargs)

    return __init__


RunConfig.__init__ = _recording_given(RunConfig.__init__)


def _check_declared(f, value: Any) -> None:
    """A setting against its own declaration: one of its choices, within its bounds."""
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"{flag} {excerpt(value)} is not valid: use one of {', '.join(meta['choices'])}")
    if meta.get("bounds"):
        low_open, high_open = meta["bounds"][0] == "(", meta["bounds"][-1] == ")"
        low, high = (float(v) for v in meta["bounds"][1:-1].split(","))
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            bound = f"{'>' if low_open else '>='} {low:g}" if high == float("inf") else f"in {meta['bounds']}"
            raise UserError(f"{flag} {value} is not valid: it must be {bound}")
