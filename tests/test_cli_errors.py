"""A user mistake is one clear line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import pytest
import timm
from safetensors.torch import save_file

from warmstart.cli import main

from conftest import COLORS, FAST, make_color_images


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _mistakes(tmp_path, color_tree):
    empty = tmp_path / "empty"
    empty.mkdir()
    hollow = tmp_path / "hollow"
    make_color_images(hollow / "a", COLORS[0], 3, 0)
    (hollow / "b").mkdir()
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("missing/one.jpg,a\nmissing/two.jpg,b\n")
    other = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(other))
    data = ["--data", str(color_tree)]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    nul_csv = tmp_path / "nul.csv"
    nul_csv.write_bytes(b"path,label\nimg\x00.jpg,a\nb.jpg,b\n")
    one_class = tmp_path / "one-class"
    make_color_images(one_class / "a", COLORS[0], 3, 0)
    return {
        "data is a device": (["train", "--data", "/dev/zero"], "not a .csv manifest"),
        "out under a file": (["train", *data, "--out", str(a_file / "sub")], "cannot create that folder"),
        "out in /proc": (["train", *data, "--out", "/proc/warmstart-run"], "cannot create that folder"),
        "cache dir is a file": (["train", *data, "--cache-dir", str(a_file)], "is a file: pass a folder"),
        "NUL byte in a csv": (["train", "--data", str(nul_csv)], "holds a NUL byte"),
        "recipes for one class": (["recipes", "--data", str(one_class)], "a classifier needs at least 2"),
        "missing data": (["train", "--data", str(tmp_path / "nope")], "does not exist"),
        "empty data": (["train", "--data", str(empty)], "is empty"),
        "class without images": (["train", "--data", str(hollow)], "no images"),
        "unknown model": (["train", *data, "--model", "resnet5O", "--weights", "none"], "unknown model"),
        "bundled for another model": (["train", *data, "--model", "resnet50"], "only, not resnet50"),
        "weights file missing": (["train", *data, "--weights", str(tmp_path / "w.pth")], "does not exist"),
        "wrong architecture": (["train", *data, "--weights", str(other)], "do not fit"),
        "csv unknown paths": (["train", "--data", str(csv_bad)], "do not exist"),
        "bad number": (["train", *data, "--epochs", "-1"], "--epochs -1 is not valid"),
        "huge input size": (["train", *data, "--input-size", "20000"], "--input-size 20000 is not valid: it must be in [8, 2048]"),
        "huge input scale": (["train", *data, "--input-scale", "100"], "--input-scale 100.0 is not valid: it must be in (0, 8]"),
        "port out of range": (["serve", str(tmp_path), "--port", "99999"], "--port 99999 is not valid: it must be in [1, 65535]"),
        "not a number": (["train", *data, "--lr", "fast"], "invalid float value"),
        "bad choice": (["train", *data, "--strategy", "everything"], "invalid choice"),
        "partial without target": (["train", *data, "--strategy", "partial"], "--trainable PATTERN"),
        "unknown option": (["train", *data, "--epoch", "3"], "unrecognized arguments"),
        "not a run": (["predict", str(tmp_path), "x.jpg"], "not a trained run"),
        "missing config": (["train", "--config", str(tmp_path / "c.yaml")], "does not exist"),
        "bad unfreeze schedule": (["train", *data, "--unfreeze-schedule", "2:x"], "write EPOCH:N"),
        "unknown recipe": (["train", *data, "--recipe", "fastest"], "invalid choice"),
        "lbfgs on the whole network": (["train", *data, "--optimizer", "lbfgs", "--strategy", "fine-tune"],
                                       "lbfgs fits the head"),
        "lr-find too few steps": (["lr-find", *data, "--steps", "3"], "too few"),
        "lr-find with lbfgs": (["lr-find", *data, "--optimizer", "lbfgs", "--augment", "none"], "no learning rate"),
        "tune without a base config": (["tune", "--config", str(tmp_path / "c.yaml"), "--space", "s.yaml",
                                        "--trials", "2"], "does not exist"),
    }


CASES = ["data is a device", "out under a file", "out in /proc", "cache dir is a file", "NUL byte in a csv",
         "recipes for one class", "missing data", "empty data", "class without images", "unknown model", "bundled for another model",
         "weights file missing", "wrong architecture", "csv unknown paths", "bad number", "huge input size",
         "huge input scale", "port out of range", "not a number",
         "bad choice", "partial without target", "unknown option", "not a run", "missing config",
         "bad unfreeze schedule", "unknown recipe", "lbfgs on the whole network", "lr-find too few steps",
         "lr-find with lbfgs", "tune without a base config"]


@pytest.mark.parametrize("case", CASES)
def test_user_mistakes_exit_2_with_one_line(case, tmp_path, color_tree, capsys):
    argv, expected = _mistakes(tmp_path, color_tree)[case]
    code, err = _run(capsys, argv + (FAST[2:] if "--input-size" in argv else FAST if argv[0] in ("train", "lr-find")
                                     else []))
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err


def test_config_file_with_unknown_setting(tmp_path, capsys, color_tree):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {color_tree}\nepoch: 3\n")
    code, err = _run(capsys, ["train", "--config", str(config)])
    assert code == 2 and "unknown setting(s) epoch" in err


@pytest.mark.slow
def test_error_in_a_real_process_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "warmstart", "train", "--data", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_models_lists_familiar_names_with_size_and_params(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["nasnet_a_large"][1:3] == ["nasnetalarge", "331"]
    assert lines["inception_v4"][2] == "299" and lines["resnet50"][3] == "25.6M"
    assert lines["efficientnet_lite0"][1] == "tf_efficientnet_lite0"
    assert main(["models", "convnext_atto*"]) == 0
    assert "convnext_atto" in capsys.readouterr().out
