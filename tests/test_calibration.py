"""Probabilities a user can trust: temperature scaling fitted on validation logits, used by every
way of asking the model (predict, eval, ONNX, the service), and said where it cannot be fitted."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from warmstart import RunConfig, train
from warmstart.calibration import Calibration, expected_calibration_error, fit_temperature, reliability
from warmstart.evaluate import metrics_from_logits
from warmstart.run_dir import load_run

FAST = dict(input_size=64, workers=0, quiet=True, augment="none")


@pytest.mark.parametrize("true_temperature", [0.3, 1.0, 3.0])
def test_the_fitted_temperature_recovers_a_known_one(true_temperature):
    """Labels drawn from softmax(z); the model shows z / T: over-confident (T < 1 shown as logits
    too large by 1/T) or under-confident; the fit finds T within 5%."""
    generator = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20_000, 10, generator=generator)
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).flatten()
    shown = z / true_temperature
    fitted = fit_temperature(shown, labels)
    assert fitted == pytest.approx(1 / true_temperature, rel=0.05)  # dividing by it undoes the distortion
    calibration = Calibration.fit(shown, labels)
    assert calibration.ece_after < 0.02 and calibration.nll_after <= calibration.nll_before + 1e-6
    if true_temperature != 1.0:
        assert calibration.ece_before > 0.05


def test_ece_is_the_15_bin_gap_between_confidence_and_accuracy():
    # 4 images at confidence ~0.9 (two right) and 4 at ~0.6 (all right)
    high, low = torch.log(torch.tensor([0.9, 0.1])), torch.log(torch.tensor([0.6, 0.4]))
    logits = torch.stack([high] * 4 + [low] * 4)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-6)
    assert [b["count"] for b in reliability(logits, labels)["bins"]] == [4, 4]
    evaluation = metrics_from_logits(logits, labels, ["a", "b"])
    scaled = evaluation.scaled(0.5)
    assert scaled.top1 == evaluation.top1 and scaled.ece != evaluation.ece  # T never moves the argmax


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.slow  # exports ONNX and serves: end to end
def test_a_run_calibrates_on_val_and_every_output_is_softmax_of_logits_over_t(color_tree, tmp_path, capsys):
    from warmstart.export import export_run
    from warmstart.models.create import build_model
    from warmstart.predict import OnnxBackend, TorchBackend
    from safetensors.torch import load_file

    from conftest import COLORS, make_color_images

    for c, folder in enumerate(sorted((color_tree / "val").iterdir())):  # 8 val photos a class: 24 fit a temperature
        make_color_images(folder, COLORS[c], 8, seed=200 + c)
    run = train(RunConfig(data=str(color_tree), epochs=4, label_smoothing=0.3, out=str(tmp_path / "r"), **FAST))
    log = capsys.readouterr().out
    meta = json.loads((run.run_dir / "model.json").read_text())
    t = meta["temperature"]
    assert f"calibration: temperature {t:.3f} fitted on 24 val images" in log
    c = run.metrics["calibration"]
    assert c["temperature"] == t and c["ece_after"] <= c["ece_before"] and run.metrics["ece"] == c["ece_after"]
    assert json.loads((run.run_dir / "eval.json").read_text())["ece"] == pytest.approx(c["ece_after"])
    assert run.metrics["top1"] == run.history[-1]["val_top1"]  # calibration left top-1 alone
    # the raw network's logits, divided by T, give every backend's probabilities
    raw = build_model(meta["architecture"], 3).eval()
    raw.load_state_dict(load_file(str(run.run_dir / "model.safetensors")))
    photo = Image.open(next((color_tree / "val" / "n00000002-green_thing").iterdir())).convert("RGB")
    torch_backend = TorchBackend(run.run_dir)
    with torch.inference_mode():
        logits = raw(torch_backend.transform(photo)[None]).numpy()
    expected = _softmax(logits / t)
    assert np.allclose(torch_backend.probabilities([photo]), expected, atol=1e-5)
    onnx = OnnxBackend(export_run(run.run_dir, "onnx").path)
    assert onnx.meta["calibrated"] is True and onnx.meta["temperature"] == t
    assert np.allclose(onnx.probabilities([photo]), expected, atol=1e-4)
    assert load_run(run.run_dir).export_metadata()["temperature"] == t
    # the service answers with the same calibrated probabilities, and says so
    import io

    from fastapi.testclient import TestClient

    from warmstart.serve.app import ServeSettings, create_app

    upload = io.BytesIO()
    photo.save(upload, "PNG")
    with TestClient(create_app(ServeSettings(str(run.run_dir)))) as client:
        answer = client.post("/predict", files={"file": ("g.png", upload.getvalue(), "image/png")}).json()
        assert client.get("/metadata").json()["calibrated"] is True
    best = int(expected[0].argmax())
    assert answer["predictions"][0]["probability"] == pytest.approx(float(expected[0, best]), abs=1e-4)


def test_without_validation_the_probabilities_are_said_to_be_uncalibrated(color_tree, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from warmstart.serve.app import ServeSettings, create_app

    run = train(RunConfig(data=str(color_tree / "train"), val_fraction=0.0, epochs=2, out=str(tmp_path / "r"),
                          **FAST))
    assert "no validation split: the probabilities are not calibrated" in capsys.readouterr().out
    assert json.loads((run.run_dir / "model.json").read_text())["temperature"] is None
    assert run.metrics["calibration"] is None
    with TestClient(create_app(ServeSettings(str(run.run_dir)))) as client:
        assert client.get("/metadata").json()["calibrated"] is False
    off = train(RunConfig(data=str(color_tree), epochs=2, calibrate=False, out=str(tmp_path / "off"), **FAST))
    assert "calibration off (--no-calibrate)" in capsys.readouterr().out and off.metrics["calibration"] is None
