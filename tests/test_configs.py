"""The Stanford Dogs recipes load as run configs, and the demo ones match the original runs."""

from pathlib import Path

import pytest

from warmstart import RunConfig
from warmstart.models.registry import resolve_architecture

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "stanford-dogs"
DEMO = {"resnet50": (10, 5), "inception_v4": (4, 2), "nasnet_a_large": (4, 2)}


@pytest.mark.parametrize("network", sorted(DEMO))
def test_demo_recipes_reproduce_the_original_settings(network):
    config = RunConfig.from_yaml(RECIPES / f"{network}-demo.yaml")
    epochs, boundary = DEMO[network]
    assert (config.model, config.strategy, config.optimizer, config.momentum, config.lr) == \
        (network, "feature-extractor", "sgd", 0.9, 0.1)
    assert config.epochs == epochs and config.piecewise_boundaries == [boundary] == [epochs / 2]
    assert config.piecewise_lr_decay == [1.0, 0.1] and config.batch_size == 16 and config.data == "stanford-dogs"
    assert config.input_size is None  # the network's native size from its pretrained config
    resolve_architecture(config.model, config.weights)


@pytest.mark.parametrize("network", sorted(DEMO))
def test_modern_recipes_are_valid(network):
    config = RunConfig.from_yaml(RECIPES / f"{network}-modern.yaml")
    assert config.strategy in ("fine-tune", "partial") and config.label_smoothing > 0
    resolve_architecture(config.model, config.weights)
