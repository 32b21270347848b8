"""Feature cache (keys, invalidation, resume, views), pre-resized image cache, fast-path options."""

import os

import numpy as np
import pytest
import torch

from warmstart import RunConfig, train
from warmstart.compute.runtime import Runtime
from warmstart.data import data_config_for, eval_transform, resolve_splits, train_transform
from warmstart.data import feature_cache as fc
from warmstart.data.image_cache import cached_images
from warmstart.data.images import BoxedImage, open_image
from warmstart.errors import UserError
from warmstart.models import create_model
from warmstart.train.cached import frozen_features

CPU = Runtime(torch.device("cpu"), "fp32", False)  # loads on the per-sample path, computes in fp32


def _config(data, out, **kw):
    base = dict(data=str(data), input_size=64, workers=0, quiet=True, out=str(out), epochs=2, batch_size=8,
                augment="none")
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.slow
def test_a_shared_cache_dir_skips_extraction_the_second_time(color_tree, tmp_path):
    first = train(_config(color_tree, tmp_path / "a", cache_dir=str(tmp_path / "cache")))
    second = train(_config(color_tree, tmp_path / "b", cache_dir=str(tmp_path / "cache")))
    assert not first.metrics["features_from_cache"] and second.metrics["features_from_cache"]
    assert second.metrics["top1"] == first.metrics["top1"] and second.history == [
        {**h, "seconds": second.history[i]["seconds"], "images_per_sec": second.history[i]["images_per_sec"]}
        for i, h in enumerate(first.history)]
    # anything that changes the features makes a new cache entry
    third = train(_config(color_tree, tmp_path / "c", cache_dir=str(tmp_path / "cache"), input_size=72))
    assert not third.metrics["features_from_cache"]
    image = next((color_tree / "train" / "n00000001-red_thing").iterdir())
    os.utime(image, ns=(0, 0))
    fourth = train(_config(color_tree, tmp_path / "d", cache_dir=str(tmp_path / "cache")))
    assert not fourth.metrics["features_from_cache"]


def test_cache_key_covers_every_part(color_tree, lite0, tmp_path):
    images = resolve_splits(str(color_tree), 0.2, 0)["train"]
    transform = eval_transform(data_config_for(lite0, 64))
    cache = fc.FeatureCache(tmp_path, "model-a")
    base = cache.key(images, fc.View("train", transform, 0, None))
    boxed = images.subset(range(len(images)))
    boxed.items[0] = BoxedImage(boxed.items[0], (0, 0, 20, 20))
    relabelled = images.subset(range(len(images)))
    relabelled.labels[0] = 2
    variants = [
        fc.FeatureCache(tmp_path, "model-b").key(images, fc.View("train", transform, 0, None)),  # other weights
        cache.key(images, fc.View("train", eval_transform(data_config_for(lite0, 72)), 0, None)),  # preprocessing
        cache.key(images, fc.View("train", train_transform(data_config_for(lite0, 64), "standard"), 1, 11)),  # view
        cache.key(images, fc.View("train", transform, 0, 12)),  # augmentation seed
        cache.key(images.subset(range(len(images) - 1)), fc.View("train", transform, 0, None)),  # image list
        cache.key(boxed, fc.View("train", transform, 0, None)),  # crop box
        cache.key(relabelled, fc.View("train", transform, 0, None)),  # labels
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert cache.key(images, fc.View("train", eval_transform(data_config_for(lite0, 64)), 0, None)) == base
    with open(images.items[3], "ab") as handle:  # a file whose size changes
        handle.write(b"\0")
    assert cache.key(images, fc.View("train", transform, 0, None)) != base


def test_interrupted_extraction_resumes_and_is_never_taken_as_complete(color_tree, lite0, tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "FLUSH_EVERY", 1)
    images = resolve_splits(str(color_tree), 0.2, 0)["train"]
    transform = eval_transform(data_config_for(lite0, 64))
    forward = frozen_features(lite0, "lite0", CPU, (3, 64, 64))[0]
    reference = fc.FeatureCache(tmp_path / "ref", "m").features(fc.View("train", transform), images, forward, CPU, 8,
                                                                0)
    assert reference.computed == 36 and bool(reference.valid.all())

    calls = {"n": 0}

    def dies_on_third_batch(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is stopped mid-extraction
        return forward(x)

    cache = fc.FeatureCache(tmp_path / "c", "m")
    with pytest.raises(KeyboardInterrupt):
        cache.features(fc.View("train", transform), images, dies_on_third_batch, CPU, 8, 0)
    folder = cache.folder("train", cache.key(images, fc.View("train", transform, 0, None)))
    assert '"complete": false' in (folder / "meta.json").read_text()
    assert int((np.load(folder / "status.npy") == fc.DONE).sum()) == 16
    resumed = cache.features(fc.View("train", transform), images, forward, CPU, 8, 0)
    assert resumed.computed == 20  # only the rows that were not done
    assert torch.allclose(resumed.features, reference.features, atol=1e-5)
    assert '"complete": true' in (folder / "meta.json").read_text()
    assert cache.features(fc.View("train", transform), images, forward, CPU, 8, 0).computed == 0


@pytest.mark.slow  # an end-to-end run: outside the inner loop
def test_cached_views_are_augmented_deterministic_and_trained_on(color_tree, lite0, tmp_path):
    images = resolve_splits(str(color_tree), 0.2, 0)["train"]
    augmented = train_transform(data_config_for(lite0, 64), "standard")
    forward = frozen_features(lite0, "lite0", CPU, (3, 64, 64))[0]
    view, view2 = fc.View("train", augmented, 1, 11), fc.View("train", augmented, 2, 12)
    one = fc.FeatureCache(tmp_path / "a", "m").features(view, images, forward, CPU, 8, 0)
    again = fc.FeatureCache(tmp_path / "b", "m").features(view, images, forward, CPU, 5, 2)
    other = fc.FeatureCache(tmp_path / "c", "m").features(view2, images, forward, CPU, 8, 0)
    plain = fc.FeatureCache(tmp_path / "d", "m").features(fc.View("train", eval_transform(data_config_for(lite0, 64))),
                                                          images, forward, CPU, 8, 0)
    assert torch.allclose(one.features, again.features, atol=1e-5)  # whatever the batch size and workers
    assert not torch.allclose(one.features, other.features) and not torch.allclose(one.features, plain.features)
    result = train(_config(color_tree, tmp_path / "run", augment="standard", cache_views=3))
    assert result.metrics["feature_cache"]
    assert len(list((result.run_dir / "cache").glob("train-*"))) == 3


def test_image_cache_gives_the_same_evaluation_view_and_results(color_tree, lite0, tmp_path):
    images = resolve_splits(str(color_tree), 0.2, 0)["val"]
    transform = eval_transform(data_config_for(lite0, 64))
    cached = cached_images(images, transform.transforms[0], tmp_path / "cache", workers=0)
    for original, fast in zip(images.items[:5], cached.items[:5]):
        assert torch.equal(transform(open_image(original)), transform(open_image(fast)))
    plain = train(_config(color_tree, tmp_path / "plain", epochs=3))
    fast = train(_config(color_tree, tmp_path / "fast", epochs=3, image_cache=True))
    assert fast.metrics["image_cache"] and fast.metrics["top1"] == plain.metrics["top1"]
    assert [h["train_loss"] for h in fast.history] == pytest.approx([h["train_loss"] for h in plain.history])


def test_image_cache_keeps_skipping_unreadable_files(color_tree, tmp_path):
    bad = color_tree / "train" / "n00000001-red_thing" / "broken.jpg"
    bad.write_bytes(b"nope")
    result = train(_config(color_tree, tmp_path / "run", image_cache=True, augment="standard", epochs=1))
    assert "broken.jpg" in (result.run_dir / "skipped.txt").read_text()


def test_bf16_channels_last_and_synthetic_data(tmp_path):
    seen = []  # what the model's first layer receives: memory format, and whether bf16 autocast is on

    def first_conv(module, args):
        if isinstance(module, torch.nn.Conv2d) and module.training and not seen:
            seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                         torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(first_conv)
    try:
        # few, small images: bf16 is fast on CPUs with bf16 instructions and very slow on the others
        result = train(RunConfig(data="synthetic:24", strategy="fine-tune", precision="bf16", epochs=1, batch_size=8,
                                 input_size=32, workers=0, quiet=True, out=str(tmp_path / "syn")))
    finally:
        hook.remove()
    assert seen == [(True, True)]
    assert result.metrics["precision"] == "bf16" and result.metrics["num_classes"] == 10
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train(RunConfig(data="synthetic:96", precision="fp16", input_size=64, workers=0, quiet=True,
                        out=str(tmp_path / "fp16")))


@pytest.mark.slow
def test_boundary_cache_trains_the_tail_like_the_whole_model(color_tree, tmp_path):
    kw = dict(strategy="partial", unfreeze_last=1, epochs=3, lr=0.05, seed=2, engine="torch")  # one engine: the
    # mechanism alone (engine parity: test_engine.py)
    full = train(_config(color_tree, tmp_path / "full", **kw))
    tail = train(_config(color_tree, tmp_path / "tail", cache_boundary=True, **kw))
    assert not full.metrics["feature_cache"] and tail.metrics["feature_cache"]
    assert list((tail.run_dir / "cache").glob("train-boundary-*"))
    from warmstart.run_dir import load_run

    a, b = (load_run(r.run_dir).network.state_dict() for r in (full, tail))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    assert [h["train_loss"] for h in tail.history] == pytest.approx([h["train_loss"] for h in full.history], abs=1e-4)
    assert tail.metrics["top1"] == full.metrics["top1"]
    # the frozen prefix really stayed frozen
    before, _, _ = create_model("efficientnet_lite0", 3, "bundled")
    assert all(torch.equal(before.state_dict()[k], b[k]) for k in b if k.startswith(("conv_stem", "blocks.0.")))


def test_every_view_and_split_is_extracted_through_one_loader(color_tree, tmp_path, monkeypatch, lite0):
    """One set of loader workers for all of a run's passes (no start-up per view), with the same
    features as extracting each view on its own; a second call computes nothing."""
    from warmstart.data import loaders

    splits = resolve_splits(str(color_tree), 0.2, 0)
    config = data_config_for(lite0, 64)
    views = [(fc.View("train", eval_transform(config)), splits["train"]),
             (fc.View("train", train_transform(config, "standard"), 1, 11), splits["train"]),
             (fc.View("val", eval_transform(config)), splits["val"])]
    made = []
    original = loaders._data_loader
    monkeypatch.setattr(loaders, "_data_loader", lambda *args, **kw: made.append(1) or original(*args, **kw))
    forward = frozen_features(lite0, "lite0", CPU, (3, 64, 64))[0]
    together = fc.FeatureCache(tmp_path / "one", "lite0").features_of(views, forward, CPU, 8, 2)
    assert len(made) == 1 and [t.computed for t in together] == [len(splits["train"])] * 2 + [len(splits["val"])]
    alone = [fc.FeatureCache(tmp_path / "each", "lite0").features(view, images, forward, CPU, 8, 0)
             for view, images in views]
    assert len(made) == 4
    for a, b in zip(together, alone):
        assert torch.allclose(a.features, b.features, atol=1e-5) and bool(a.valid.all())
    again = fc.FeatureCache(tmp_path / "one", "lite0").features_of(views, forward, CPU, 8, 2)
    assert len(made) == 4 and [a.computed for a in again] == [0, 0, 0]
