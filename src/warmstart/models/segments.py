"""A network's forward_features as an ordered list of segments, to split it at the freeze
boundary: a frozen prefix whose activations can be cached, and a trainable tail.

Known layouts (EfficientNet/MobileNet blocks, ResNet layers, stem + stages) are tried, and the
split is only used once running the segments one after another reproduces forward_features.
"""

from __future__ import annotations

import torch
from torch import nn


def _candidates(model: nn.Module) -> list[nn.Module] | None:
    names = dict(model.named_children())
    if {"conv_stem", "bn1", "blocks", "conv_head", "bn2"} <= names.keys():  # EfficientNet, MobileNetV3-like
        return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, nn.Sequential(model.conv_head, model.bn2)]
    if {"conv_stem", "bn1", "blocks"} <= names.keys():
        return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks]
    if {"conv1", "bn1", "act1", "maxpool", "layer1", "layer4"} <= names.keys():  # ResNet
        return [nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool),
                model.layer1, model.layer2, model.layer3, model.layer4]
    if {"stem", "stages"} <= names.keys():  # ConvNeXt, ResNetV2, RegNet, ...
        tail = [getattr(model, n) for n in ("norm_pre", "final_conv", "norm") if n in names and
                not isinstance(getattr(model, n), nn.Identity)]
        return [model.stem, *model.stages, *tail]
    return None


@torch.no_grad()
def feature_segments(model: nn.Module, input_size: tuple[int, int, int]) -> list[nn.Module] | None:
    """The segments whose composition equals model.forward_features, or None."""
    segments = _candidates(model)
    if not segments:
        return None
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
        expected = model.forward_features(x)
        for segment in segments:
            x = segment(x)
        same = x.shape == expected.shape and torch.allclose(x, expected, atol=1e-4, rtol=1e-4)
    except Exception:
        same = False
    finally:
        model.train(was_training)
    return segments if same else None


def split_at_freeze_boundary(model: nn.Module, input_size) -> tuple[nn.Sequential, nn.Sequential] | None:
    """(frozen prefix, trainable tail) of forward_features, or None when there is no frozen prefix
    or the model's layout is not known."""
    segments = feature_segments(model, input_size)
    if not segments:
        return None
    first = next((i for i, s in enumerate(segments) if any(p.requires_grad for p in s.parameters())), None)
    if not first:  # nothing trains before the head (feature extractor) or the first segment trains
        return None
    return nn.Sequential(*segments[:first]), nn.Sequential(*segments[first:])
