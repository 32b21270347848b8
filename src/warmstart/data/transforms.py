"""Preprocessing from the model's pretrained config (timm's data config)."""

from __future__ import annotations

from typing import Any

from timm.data import create_transform, resolve_data_config
from torchvision import transforms


def data_config_for(model, input_size: int | None = None, crop_pct: float | None = None,
                    input_scale: float | None = None) -> dict[str, Any]:
    """Size, mean/std, interpolation and crop from the model's pretrained config, with overrides:
    `input_size` in pixels, or `input_scale` x the pretrained size (rounded to a multiple of 32)."""
    config = resolve_data_config({}, model=model)
    if input_size is None and input_scale is not None:
        input_size = max(32, int(round(config["input_size"][-1] * input_scale / 32)) * 32)
    if input_size is not None:
        config["input_size"] = (3, input_size, input_size)
    if crop_pct is not None:
        config["crop_pct"] = crop_pct
    config["input_size"] = tuple(int(v) for v in config["input_size"])
    config["mean"] = tuple(float(v) for v in config["mean"])
    config["std"] = tuple(float(v) for v in config["std"])
    return config


def eval_transform(data_config: dict[str, Any]):
    """Resize by crop_pct, center crop, normalise: the pretrained model's own evaluation view."""
    return create_transform(**data_config, is_training=False)


def mirrored_eval_transform(data_config: dict[str, Any]):
    """The evaluation view, mirrored (the second view of flip test-time augmentation)."""
    view = eval_transform(data_config)
    return transforms.Compose([*view.transforms, transforms.RandomHorizontalFlip(p=1.0)])


def train_transform(data_config: dict[str, Any], augment: str):
    """`standard`: random-resized-crop + horizontal flip; `none`: the evaluation view."""
    if augment == "none":
        return eval_transform(data_config)
    return create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        hflip=0.5,
        color_jitter=None,
        auto_augment=None,
    )
