"""What trains under each strategy, and frozen weights / BN statistics staying bit-identical."""

import pytest
import torch

from warmstart import RunConfig, train
from warmstart.errors import UserError
from warmstart.models import apply_strategy, create_model
from warmstart.run_dir import load_run


def _model():
    model, _, _ = create_model("efficientnet_lite0", 3, "bundled")
    return model


def test_feature_extractor_trains_only_the_head():
    model = _model()
    chosen = apply_strategy(model, "feature-extractor")
    assert chosen.trainable == ["classifier.weight", "classifier.bias"]
    assert chosen.count(model) == 1280 * 3 + 3
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(chosen.frozen_norms) == len(bns) > 0


def test_partial_by_pattern_and_by_last_stages():
    model = _model()
    chosen = apply_strategy(model, "partial", patterns=["blocks.6.*", "conv_head"])
    assert set(chosen.trainable) == {n for n, _ in model.named_parameters()
                                     if n.startswith(("blocks.6.", "conv_head.", "classifier."))}
    frozen_bn_names = {n for n, m in model.named_modules() if m in chosen.frozen_norms}
    assert "blocks.6.0.bn1" not in frozen_bn_names and "blocks.5.0.bn1" in frozen_bn_names

    chosen = apply_strategy(model, "partial", unfreeze_last=1)
    prefixes = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "") for n in chosen.trainable}
    assert "blocks.6" in prefixes and "classifier" in prefixes and "blocks.5" not in prefixes
    two = apply_strategy(model, "partial", unfreeze_last=2)
    assert set(chosen.trainable) < set(two.trainable)
    assert any(n.startswith("blocks.5.") for n in two.trainable)
    with pytest.raises(UserError, match="more than the model"):
        apply_strategy(model, "partial", unfreeze_last=99)
    with pytest.raises(UserError, match="matches no parameter"):
        apply_strategy(model, "partial", patterns=["nonexistent.*"])


def test_fine_tune_trains_everything():
    model = _model()
    chosen = apply_strategy(model, "fine-tune")
    assert chosen.count(model) == sum(p.numel() for p in model.parameters()) and not chosen.frozen_norms


@pytest.mark.slow  # an end-to-end run: outside the inner loop
@pytest.mark.parametrize("strategy,extra", [("feature-extractor", {}), ("partial", {"trainable": ["blocks.6"]})])
def test_frozen_weights_and_bn_statistics_are_bit_identical_after_training(color_tree, tmp_path, strategy, extra):
    # augmentation forces the backbone to run in train mode every step (no feature cache)
    config = RunConfig(data=str(color_tree), strategy=strategy, augment="standard", epochs=2, batch_size=8,
                       input_size=64, workers=0, quiet=True, out=str(tmp_path / "run"), lr=0.05, **extra)
    before, _, _ = create_model("efficientnet_lite0", 3, "bundled")
    result = train(config)
    assert not result.metrics["feature_cache"]
    after = load_run(result.run_dir).network.state_dict()
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    if strategy == "feature-extractor":
        assert changed == {"classifier.weight", "classifier.bias"}
    else:
        # trainable tail: weights and its own BN statistics move; everything before stays
        assert changed and all(k.startswith(("blocks.6.", "classifier.")) for k in changed)
        assert any(k.endswith("running_mean") for k in changed)


def test_one_decision_of_the_training_path_says_why():
    from warmstart.train.paths import ACTIVATIONS, FEATURES, IMAGES, choose_training_path

    model, _, _ = create_model("efficientnet_lite0", 3, "bundled")
    head_only = apply_strategy(model, "feature-extractor")
    tail = apply_strategy(model, "partial", unfreeze_last=1)

    def path(trainable, **settings):
        config = RunConfig(data="x", **settings).validated()
        return choose_training_path(config, model, trainable, (3, 64, 64), distributed=False)

    assert path(head_only, augment="none").kind == FEATURES
    assert path(head_only, augment="standard", cache_views=3).kind == FEATURES
    fresh = path(head_only, augment="standard")
    assert fresh.kind == IMAGES and "fresh augmentation" in fresh.reason
    assert path(head_only, augment="none", mixup=0.2).kind == IMAGES
    assert path(tail, strategy="partial", unfreeze_last=1, augment="none", cache_boundary=True).kind == ACTIVATIONS
    # the cache switched off wins over --cache-boundary: nothing is cached, and the run says why
    off = path(tail, strategy="partial", unfreeze_last=1, augment="none", cache_boundary=True, feature_cache=False)
    assert off.kind == IMAGES and off.warning and "--no-feature-cache" in off.reason
    remote = choose_training_path(RunConfig(data="x", strategy="partial", unfreeze_last=1, augment="none",
                                            cache_boundary=True).validated(), model, tail, (3, 64, 64), True)
    assert remote.kind == IMAGES and "single process" in remote.reason
