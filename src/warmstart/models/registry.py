"""Network names: any timm model, plus the familiar names of the original TensorFlow demo."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import timm
import torch

from ..errors import UserError

# familiar name -> timm architecture
ALIASES = {
    "resnet50": "resnet50",
    "resnet_v1_50": "resnet50",
    "resnet_v2_50": "resnetv2_50",
    "inception_v4": "inception_v4",
    "nasnet_a_large": "nasnetalarge",
    "nasnet": "nasnetalarge",
    "efficientnet_lite0": "efficientnet_lite0",
}
# the bundled offline weights fit exactly this architecture (TF "same" padding)
BUNDLED_ARCH = "tf_efficientnet_lite0"
BUNDLED_NAMES = {"efficientnet_lite0", "tf_efficientnet_lite0"}
FAMILIAR = ["efficientnet_lite0", "resnet50", "resnet_v2_50", "inception_v4", "nasnet_a_large"]


def resolve_architecture(name: str, weights: str) -> str:
    """The timm architecture to build for a user-facing model name and weights choice."""
    if weights == "bundled":
        if name not in BUNDLED_NAMES:
            raise UserError(
                f"--weights bundled holds EfficientNet-Lite0 only, not {name}: use --model efficientnet_lite0, "
                f"or --weights hub / --weights PATH for {name}"
            )
        return BUNDLED_ARCH
    arch = ALIASES.get(name, name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(name, FAMILIAR + timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown model {name!r}{hint}: 'warmstart models PATTERN' lists timm's names")
    return arch


@dataclass
class ModelInfo:
    name: str
    architecture: str
    input_size: int
    params: int


def model_info(name: str) -> ModelInfo:
    """Input size and parameter count, measured on the meta device (no memory, no download)."""
    arch = BUNDLED_ARCH if name == "efficientnet_lite0" else ALIASES.get(name, name)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    return ModelInfo(name, arch, int(model.pretrained_cfg["input_size"][-1]), params)


def list_model_names(pattern: str | None = None) -> list[str]:
    if not pattern:
        return list(FAMILIAR)
    familiar = [n for n in FAMILIAR if pattern.strip("*") in n]
    return familiar + [n for n in timm.list_models(pattern if "*" in pattern else f"*{pattern}*") if n not in familiar]
