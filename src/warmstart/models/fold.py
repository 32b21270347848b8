"""An inference copy of a network with each BatchNorm folded into the convolution that feeds it.

In eval mode a BatchNorm is a per-channel scale and shift, which the convolution before it can
absorb (its weights scaled, a bias added): the copy runs one kernel where the network ran two. On
this project's 2-core CPU BatchNorm was 29% of EfficientNet-Lite0's inference time (BENCHMARKS.md).
Which convolution feeds which BatchNorm is read from one forward pass, so it works for any timm
network; the copy is checked against the original on that pass and not used where they differ
(a convolution whose output also goes elsewhere, a BatchNorm subclass that does more)."""

from __future__ import annotations

import copy

import torch
from torch import nn

TOLERANCE = 1e-3  # relative to the output's scale: float rounding only


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A folded eval-mode copy of `model` for inference, or `model` itself where nothing folds or
    the copy does not compute the same (never used for training: its state dict differs)."""
    if hasattr(model, "_orig_mod") or not any(_foldable(m) for m in model.modules()):
        return model  # compiled, or no BatchNorm with running statistics
    folded = copy.deepcopy(model).eval()
    try:
        example = _example(model)
        pairs, expected = _conv_batchnorm_pairs(folded, example)
        if not pairs:
            return model
        names = {module: name for name, module in folded.named_modules()}
        for conv, norm in pairs:
            _fold_into(conv, norm)
            parent, _, child = names[norm].rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, child, _after_norm(norm))
        with torch.inference_mode():
            got = _features(folded, example)
    except Exception:  # noqa: BLE001 - a network this cannot trace keeps its own BatchNorms
        return model
    scale = float(expected.abs().max()) or 1.0
    return folded if float((expected - got).abs().max()) <= TOLERANCE * max(scale, 1.0) else model


def _foldable(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and module.running_var is not None


def _example(model: nn.Module) -> torch.Tensor:
    """A seeded random image at the network's pretrained size, on its device."""
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *size), generator=generator).to(parameter.device)


def _conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list, torch.Tensor]:
    """[(convolution, BatchNorm)] where the BatchNorm's input is that convolution's output, in
    order, and the model's output on `example` (unfolded)."""
    produced_by, pairs = {}, []

    def conv_hook(module, inputs, output):
        produced_by[id(output)] = (module, output)  # the output kept alive: its id stays unique

    def norm_hook(module, inputs, output):
        found = produced_by.get(id(inputs[0]))
        if found is not None and found[1] is inputs[0]:
            pairs.append((found[0], module))

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(norm_hook) for m in model.modules() if _foldable(m)]
    try:
        with torch.inference_mode():
            output = _features(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    used = [norm for _, norm in pairs]
    return [(conv, norm) for conv, norm in pairs if used.count(norm) == 1], output


def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the check compares: the features (a new head's logits may all be zero)."""
    return model.forward_features(images) if hasattr(model, "forward_features") else model(images)


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale + (norm.bias if norm.affine else 0)
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What the BatchNorm module did after normalising: timm's BatchNormAct2d drops out (nothing in
    eval mode) and activates; a plain BatchNorm nothing."""
    parts = [getattr(norm, name) for name in ("drop", "act") if isinstance(getattr(norm, name, None), nn.Module)]
    return nn.Sequential(*parts) if parts else nn.Identity()
