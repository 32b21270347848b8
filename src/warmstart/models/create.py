"""Creating the network with a new head, restoring weights, choosing what trains."""

from __future__ import annotations

import timm
import torch

from ..errors import UserError
from .registry import resolve_architecture
from .weights import RestoreReport, classifier_names, restore_weights, source_state_dict


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except Exception as exc:
        raise UserError(f"could not build model {arch}: {exc}") from None


def create_model(
    name: str, num_classes: int, weights: str = "bundled", skip: list[str] | None = None
) -> tuple[torch.nn.Module, RestoreReport | None, str]:
    """A timm network with a head for `num_classes`, restored from `weights`.

    Returns (model, restore report or None for `none`, timm architecture).
    """
    if num_classes < 2:
        raise UserError(f"need at least 2 classes to train a classifier, found {num_classes}")
    arch = resolve_architecture(name, weights)
    model = build_model(arch, num_classes)
    if weights == "none":
        return model, None, arch
    state, source = source_state_dict(weights, arch)
    report = restore_weights(model, state, list(skip or []), source)
    if not set(classifier_names(model)) & set(report.restored):
        zero_init_head(model)
    return model, report, arch


def zero_init_head(model: torch.nn.Module) -> None:
    """A new head on pretrained features starts at zero (as in BiT): timm's own init for some
    networks draws large weights that make the first epochs on unnormalised features diverge."""
    with torch.no_grad():
        for param in model.get_classifier().parameters():
            param.zero_()
