"""What a network's frozen forward gives, as modules an engine can export: its pooled features
(`PreLogits`), and a trained run's answer built on them (`as_used`: the classifier, flip TTA, the
temperature), so that one exported graph of the features serves extraction and every use of a run
whose backbone it is."""

from __future__ import annotations

import torch
from torch import nn

from ..data.fingerprint import fingerprint_tensors
from .temperature import Temperature
from .tta import FlipTTA
from .weights import classifier_names


def architecture(network: nn.Module) -> str:
    """The network's timm architecture (its class name where timm did not build it)."""
    return getattr(network, "pretrained_cfg", {}).get("architecture") or type(network).__name__


def backbone_fingerprint(network: nn.Module) -> str:
    """The exact values of every weight but the classifier's: what the pooled features depend on."""
    head = set(classifier_names(network))
    return fingerprint_tensors({k: v for k, v in network.state_dict().items() if k not in head})


class PreLogits(nn.Module):
    """The network up to its classifier's input: forward_features, then pooling (pre_logits)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.network, "pretrained_cfg", {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.forward_head(self.network.forward_features(images), pre_logits=True)


class Classified(nn.Module):
    """Logits as the network's classifier computes them from pooled features given by `features`
    (a callable: an engine's forward of the frozen part)."""

    def __init__(self, features, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parameter = next(self.classifier.parameters(), None)
        features = self.features(images)
        return self.classifier(features if parameter is None else features.to(parameter.device))


def splits_at_classifier(network: nn.Module, input_size) -> bool:
    """Whether the network's logits are its classifier applied to its pooled features (what an
    engine computing the features alone relies on), checked on one seeded image."""
    example = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0))
    parameter = next(network.parameters(), None)
    example = example.to(parameter.device) if parameter is not None else example
    try:
        with torch.inference_mode():
            expected = network(example).float()
            got = Classified(PreLogits(network), network.get_classifier())(example).float()
    except Exception:  # noqa: BLE001 - a head that is not one module (e.g. a distilled pair)
        return False
    if got.shape != expected.shape:
        return False
    scale = max(float(expected.nan_to_num(0.0, 0.0, 0.0).abs().max()), 1.0)  # damaged weights: NaN in both
    return bool(torch.isclose(expected, got, rtol=0.0, atol=1e-4 * scale, equal_nan=True).all())


def as_used(network, tta: bool = False, temperature: float | None = None):
    """What answers for a trained run: the network, with the image and its mirror averaged (`tta`)
    and its logits divided by the fitted temperature."""
    model = FlipTTA(network) if tta else network
    return Temperature(model, temperature) if temperature else model
