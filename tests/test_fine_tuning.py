"""Fine-tuning techniques: gradual unfreezing, layer-wise learning rates, mixup/cutmix, EMA, flip TTA,
larger inputs, and the --recipe presets."""

import subprocess
import sys

import pytest
import torch

from warmstart import RunConfig, train
from warmstart.errors import UserError
from warmstart.models import apply_strategy, create_model
from warmstart.models.trainable import last_stages
from warmstart.models.tta import FlipTTA
from warmstart.models.unfreeze import GradualUnfreezing, parse_unfreeze_schedule
from warmstart.recipes import RECIPES
from warmstart.run_dir import load_run
from warmstart.train.mixing import BatchMixer
from warmstart.train.schedule import make_scheduler
from warmstart.train.steps import build_optimizer

FAST = dict(input_size=64, workers=0, quiet=True)


def _lite0(classes=3):
    model, _, _ = create_model("efficientnet_lite0", classes, "bundled")
    return model


def test_unfreeze_schedule_sets_exactly_the_scheduled_parts_per_epoch():
    model = _lite0()
    config = RunConfig(data="x", unfreeze_schedule=["2:1", "4:3", "6:all"]).validated()
    unfreezing = GradualUnfreezing(config)
    head = ["classifier.weight", "classifier.bias"]
    expected = {0: set(head), 1: set(head), 2: set(last_stages(model, 1) + head), 3: set(last_stages(model, 1) + head),
                4: set(last_stages(model, 3) + head), 5: set(last_stages(model, 3) + head),
                6: {n for n, _ in model.named_parameters()}, 9: {n for n, _ in model.named_parameters()}}
    for epoch, names in expected.items():
        chosen = unfreezing.apply(model, epoch)
        assert set(chosen.trainable) == names, epoch
        assert {n for n, p in model.named_parameters() if p.requires_grad} == names
        # BatchNorm layers of still-frozen parts are the ones kept in eval mode
        frozen = {n for n, m in model.named_modules() if m in chosen.frozen_norms}
        assert ("blocks.5.0.bn1" in frozen) == (epoch < 4)
        assert ("blocks.6.0.bn1" in frozen) == (epoch < 2)
    assert set(unfreezing.final_names(model)) == {n for n, _ in model.named_parameters()}
    assert set(apply_strategy(model, "feature-extractor").trainable) == set(head)


@pytest.mark.parametrize("entries, message", [
    (["2"], "EPOCH:N"), (["x:1"], "EPOCH:N"), (["0:1"], ">= 1"), (["3:1", "2:2"], "increase"),
    (["1:2", "2:1"], "more than"), (["1:all", "2:3"], "more than")])
def test_unfreeze_schedule_is_validated(entries, message):
    with pytest.raises(UserError, match=message):
        parse_unfreeze_schedule(entries)
    with pytest.raises(UserError, match="not fine-tune"):
        RunConfig(data="x", strategy="fine-tune", unfreeze_schedule=["1:1"]).validated()


@pytest.mark.slow  # an end-to-end run: outside the inner loop
def test_gradual_unfreezing_in_training_moves_each_part_from_its_epoch_on(color_tree, tmp_path):
    """Checkpoints after epoch 1 and 2 of `--unfreeze-schedule 1:1`: the last stage is untouched
    (weights and BN statistics) after epoch 1 and has moved after epoch 2; earlier stages never move."""
    pretrained = _lite0().state_dict()
    result = train(RunConfig(data=str(color_tree), out=str(tmp_path / "run"), epochs=2, batch_size=12,
                             unfreeze_schedule=["1:1"], optimizer="adamw", lr=1e-3, **FAST))
    after = {name: torch.load(result.run_dir / "checkpoints" / f, weights_only=True)["model"]
             for name, f in (("epoch1", "previous.pt"), ("epoch2", "last.pt"))}
    last_stage = ("blocks.6.", "conv_head.", "bn2.")

    def moved(state, prefixes):
        keys = [k for k in pretrained if k.startswith(prefixes) and pretrained[k].is_floating_point()]
        return any(not torch.equal(state[k], pretrained[k]) for k in keys)

    assert moved(after["epoch1"], ("classifier.",)) and not moved(after["epoch1"], last_stage)
    assert moved(after["epoch2"], last_stage)
    assert moved(after["epoch2"], ("blocks.6.0.bn1.running_mean",))  # it trains in train mode now
    assert not moved(after["epoch2"], ("conv_stem.", "bn1.", "blocks.0.", "blocks.5."))


def test_layer_decay_and_head_lr_give_each_group_its_rate():
    model = _lite0()
    apply_strategy(model, "fine-tune")
    config = RunConfig(data="x", strategy="fine-tune", optimizer="adamw", lr=0.1, head_lr=1.0,
                       layer_decay=0.5).validated()
    optimizer = build_optimizer(model, config)
    rate = {n: g["lr"] for g in optimizer.param_groups for n in g["param_names"]}
    assert set(rate) == {n for n, _ in model.named_parameters()}
    assert rate["classifier.weight"] == rate["classifier.bias"] == 1.0
    # the top block (timm groups conv_head with it) at lr, each block below it half of the one above
    assert rate["blocks.6.0.conv_pw.weight"] == rate["conv_head.weight"] == pytest.approx(0.1 * 0.5)
    assert rate["blocks.5.3.conv_pw.weight"] == pytest.approx(0.1 * 0.5 ** 2)
    assert rate["blocks.5.0.conv_pw.weight"] == pytest.approx(0.1 * 0.5 ** 5)
    assert rate["conv_stem.weight"] == rate["bn1.weight"] == pytest.approx(0.1 * 0.5 ** 17)
    # biases and norms have no weight decay, in every layer
    decay = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}
    assert decay["blocks.5.0.bn1.weight"] == 0 and decay["blocks.5.0.conv_pw.weight"] == config.weight_decay
    # the schedule scales every group by the same factor, keeping the ratios
    scheduler = make_scheduler(optimizer, config.replace(epochs=2), steps_per_epoch=10)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
    assert 0 < factor < 1
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor)
    # no layer decay: one rate for the body, the head's own
    plain = build_optimizer(model, RunConfig(data="x", strategy="fine-tune", lr=0.01, head_lr=0.1).validated())
    assert sorted({g["lr"] for g in plain.param_groups}) == [0.01, 0.1]


def test_mixer_mixes_pairs_and_leaves_an_odd_image_alone():
    torch.manual_seed(0)
    images, labels = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    off = BatchMixer(RunConfig(data="x"), 3)
    assert off(images, labels)[1] is labels
    mixed, targets = BatchMixer(RunConfig(data="x", mixup=0.4, cutmix=1.0), 3)(images, labels)
    assert targets.shape == (5, 3) and torch.allclose(targets.sum(1), torch.ones(5))
    assert torch.equal(targets[4], torch.tensor([0.0, 1.0, 0.0])) and torch.equal(mixed[4], images[4])
    assert not torch.equal(mixed[:4], images[:4])
    with pytest.raises(UserError, match="balance sampler"):
        RunConfig(data="x", mixup=0.2, balance="loss").validated()


@pytest.mark.slow
def test_ema_mixup_and_tta_run_together_and_the_saved_model_is_the_average(color_tree, tmp_path):
    result = train(RunConfig(data=str(color_tree), out=str(tmp_path / "run"), strategy="fine-tune", epochs=2,
                             batch_size=8, optimizer="adamw", lr=1e-3, mixup=0.2, cutmix=1.0, ema_decay=0.99,
                             tta=True, **FAST))
    assert result.metrics["tta"] is True and result.metrics["top1"] >= 2 / 3
    checkpoint = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    run = load_run(result.run_dir)
    assert isinstance(run.model.model, FlipTTA)  # inside the temperature
    saved = run.network.state_dict()
    assert all(torch.equal(saved[k], checkpoint["ema"][k].cpu()) for k in saved)
    assert any(not torch.equal(saved[k], checkpoint["model"][k]) for k in saved if saved[k].is_floating_point())


def test_flip_tta_averages_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = _lite0().eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
        assert torch.allclose(FlipTTA(model)(images).softmax(1), expected, atol=1e-6)
        symmetric = torch.cat([images[..., :32], images[..., :32].flip(3)], dim=3)
        assert torch.allclose(FlipTTA(model)(symmetric).softmax(1), model(symmetric).softmax(1), atol=1e-5)
        batches = []  # one pass over a batch of both views (one copy of the network in an export)
        model.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
        FlipTTA(model)(images)
        assert batches == [4]


@pytest.mark.slow
def test_tta_on_cached_features_uses_the_mirrored_view(color_tree, tmp_path):
    result = train(RunConfig(data=str(color_tree), out=str(tmp_path / "run"), epochs=3, augment="none", tta=True,
                             **FAST))
    assert result.metrics["feature_cache"] is True
    assert sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in (result.run_dir / "cache").iterdir()
                  if p.name.startswith("val"))[-1] == "val-mirror"
    assert result.metrics["top1"] == 1.0  # colours are easy; mirrored colour images are the same colour
    # the exported model averages the two views too (export checks parity against the TTA model)
    from warmstart.export import export_run

    exported = export_run(result.run_dir, "onnx")
    assert exported.same_top1 and exported.max_abs_logit_difference < 1e-3
    import onnx

    assert any(node.op_type in ("Slice", "Flip", "ReverseSequence") for node in onnx.load(exported.path).graph.node)


@pytest.mark.slow
def test_recipes_fill_what_is_not_given_and_all_validate(tmp_path):
    for name in RECIPES:
        config = RunConfig.from_dict({"recipe": name, "data": "x"})
        assert config.recipe == name
    best = RunConfig.from_dict({"recipe": "best", "data": "x", "epochs": 2, "input_size": 64})
    assert best.epochs == 2 and best.input_size == 64 and best.tta and best.crop_pct == 1.0
    probe = RunConfig.from_dict({"recipe": "linear-probe", "data": "x"})
    assert probe.augment == "none" and probe.strategy == "feature-extractor"
    with pytest.raises(UserError, match="not a recipe"):
        RunConfig.from_dict({"recipe": "fastest", "data": "x"})
    # a saved, resolved config runs the same settings again
    best.save(tmp_path / "config.yaml")
    assert RunConfig.from_yaml(tmp_path / "config.yaml") == best
    listing = subprocess.run([sys.executable, "-m", "warmstart", "recipes"], capture_output=True, text=True)
    assert listing.returncode == 0 and all(name in listing.stdout for name in RECIPES)


def test_input_scale_trains_and_evaluates_larger():
    from warmstart.data.transforms import data_config_for

    model = _lite0()
    assert data_config_for(model)["input_size"] == (3, 224, 224)
    assert data_config_for(model, input_scale=1.3)["input_size"] == (3, 288, 288)
    assert data_config_for(model, 96, input_scale=1.3)["input_size"] == (3, 96, 96)  # pixels win


def test_lbfgs_head_is_the_l2_logistic_regression_scikit_learn_fits():
    from sklearn.linear_model import LogisticRegression

    from warmstart.train.probe import fit_probe
    from warmstart.train.pull import HeadFit

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=generator)
    y = (x[:, :3] + 0.5 * torch.randn(300, 3, generator=generator)).argmax(1)
    config = RunConfig(data="x", optimizer="lbfgs", augment="none", weight_decay=1e-2).validated()
    head = fit_probe(x, y, None, HeadFit.of(config), classes=3)  # from zero
    # the same objective: mean loss + wd/2 |W|^2  ==  C x summed loss + 1/2 |W|^2 with C = 1 / (wd n)
    reference = LogisticRegression(C=1 / (1e-2 * 300), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    ours = head.weight.detach() - head.weight.detach().mean(0)  # softmax weights are defined up to a shift
    theirs = torch.as_tensor(reference.coef_, dtype=torch.float32)
    assert torch.allclose(ours, theirs - theirs.mean(0), atol=2e-3)
    with pytest.raises(UserError, match="lbfgs fits the head"):
        RunConfig(data="x", optimizer="lbfgs", strategy="fine-tune").validated()
    with pytest.raises(UserError, match="lbfgs fits the head"):
        RunConfig(data="x", optimizer="lbfgs", augment="standard").validated()


def test_the_printed_recipe_settings_are_a_command_line_that_runs_the_recipe():
    """What `warmstart recipes` prints for each recipe, pasted after `train`, gives that recipe's config."""
    from warmstart.cli import build_parser, config_from_args
    from warmstart.recipes import command_line

    for name, recipe in RECIPES.items():
        argv = ["train", "--data", "x", *command_line(recipe.settings).split()]
        pasted = config_from_args(build_parser().parse_args(argv))
        assert pasted.replace(recipe=name) == RunConfig.from_dict({"recipe": name, "data": "x"}), name


def test_recommendation_follows_the_measured_rule():
    from warmstart.recipes import recommend

    small = recommend(25, False, ["efficientnet_lite0"])
    assert (small.recipe, small.model) == ("best", "efficientnet_lite0") and "warmstart[zoo]" in small.why
    zoo = recommend(25, True, ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    assert zoo.model == "efficientnet_lite2" and "lp-ft" not in zoo.why and "zoo" not in zoo.why
    many = recommend(150, True, ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    assert many.recipe == "best" and "--recipe lp-ft" in many.why
    assert "lp-ft" not in recommend(150, False, ["efficientnet_lite0"]).why  # a CPU: no whole-network epochs
