"""Whole runs: reproducibility, the run directory, eval, predict from the run alone, broken images."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from warmstart import RunConfig, evaluate, predict, train
from warmstart.run_dir import load_run

from conftest import FAST

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by the inner loop (-m "not slow")


def _config(data, out, **kw):
    base = dict(data=str(data), input_size=64, workers=0, quiet=True, out=str(out), epochs=2, batch_size=8)
    base.update(kw)
    return RunConfig(**base)


def test_same_seed_same_metrics_and_weights(color_tree, tmp_path):
    kw = dict(strategy="partial", unfreeze_last=1, augment="standard", seed=3)
    a = train(_config(color_tree, tmp_path / "a", **kw))
    b = train(_config(color_tree, tmp_path / "b", **kw))
    c = train(_config(color_tree, tmp_path / "c", **{**kw, "seed": 4, "epochs": 1}))  # (any other weights)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.metrics["top1"] == b.metrics["top1"]
    wa, wb, wc = (load_run(r.run_dir).network.state_dict() for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_feature_cache_gives_the_same_head_as_running_the_backbone(color_tree, tmp_path):
    kw = dict(augment="none", seed=5, epochs=3)
    cached = train(_config(color_tree, tmp_path / "cached", **kw))
    full = train(_config(color_tree, tmp_path / "full", feature_cache=False, **kw))
    assert cached.metrics["feature_cache"] and not full.metrics["feature_cache"]
    hc, hf = (load_run(r.run_dir).network.get_classifier().weight for r in (cached, full))
    assert torch.allclose(hc, hf, atol=1e-4)
    assert cached.metrics["top1"] == full.metrics["top1"]


def test_run_directory_round_trip(color_tree, tmp_path):
    result = train(_config(color_tree, tmp_path / "run", augment="none", epochs=5, lr=0.05))
    run = result.run_dir
    for name in ("config.yaml", "restore_report.json", "model.safetensors", "model.json", "metrics.json",
                 "eval.json", "eval_confusion_matrix.csv", "eval_per_class.csv", "history.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("top1", "top5", "num_classes", "model", "epochs", "train_images_per_sec",
                "eval_images_per_sec", "wall_seconds"):
        assert key in metrics
    assert metrics["num_classes"] == 3 and metrics["top1"] == 1.0
    report = json.loads((run / "restore_report.json").read_text())
    assert report["counts"]["restored"] == 294 and sorted(report["skipped"]) == ["classifier.bias", "classifier.weight"]

    # the run moves elsewhere and predicts alone, in a fresh process
    moved = tmp_path / "elsewhere"
    shutil.copytree(run, moved)
    image = sorted((color_tree / "val" / "n00000003-blue_thing").iterdir())[0]
    out = subprocess.run([sys.executable, "-m", "warmstart", "predict", str(moved), str(image), "--json",
                          "--top-k", "2"], capture_output=True, text=True, check=True)
    answer = json.loads(out.stdout)
    assert answer[0]["top"][0]["class"] == "blue thing" and len(answer[0]["top"]) == 2
    assert predict(moved, [image])[0].top[0][0] == "blue thing"

    # the saved config re-runs as is (into a new directory)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 0.05 and saved["out"] is None
    rerun = train(RunConfig.from_yaml(run / "config.yaml", {"out": str(tmp_path / "rerun")}))
    assert rerun.metrics["top1"] == metrics["top1"]


def test_eval_writes_per_class_and_confusion(color_tree, tmp_path):
    result = train(_config(color_tree, tmp_path / "run", augment="none", epochs=5, lr=0.05))
    (color_tree / "test").symlink_to(color_tree / "val")
    evaluation = evaluate(result.run_dir, str(color_tree), split="test")
    data = json.loads((result.run_dir / "eval_test.json").read_text())
    assert data["split"] == "test" and data["num_images"] == 12 and data["top1"] == evaluation.top1
    assert set(data["per_class_accuracy"]) == {"red thing", "green thing", "blue thing"}
    assert json.loads((result.run_dir / "eval.json").read_text())["split"] == "val"  # val's stays
    rows = (result.run_dir / "eval_test_confusion_matrix.csv").read_text().splitlines()
    assert len(rows) == 4 and sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == 12


@pytest.mark.parametrize("augment", ["none", "standard"])
def test_broken_images_are_skipped_and_listed(color_tree, tmp_path, augment):
    bad_class = color_tree / "train" / "n00000001-red_thing"
    (bad_class / "truncated.jpg").write_bytes((bad_class / "img_000.jpg").read_bytes()[:200])
    (bad_class / "zero.jpg").write_bytes(b"")
    (bad_class / "text.jpg").write_text("not an image")
    result = train(_config(color_tree, tmp_path / "run", augment=augment, epochs=2))
    listed = (result.run_dir / "skipped.txt").read_text()
    assert {line.split("\t")[0].rsplit("/", 1)[-1] for line in listed.splitlines()} == {
        "truncated.jpg", "zero.jpg", "text.jpg"}
    assert result.metrics["skipped_images"] == 3


def test_cli_train_eval_predict(color_tree, tmp_path):
    run = tmp_path / "cli-run"
    cmd = [sys.executable, "-m", "warmstart"]
    subprocess.run(cmd + ["train", "--data", str(color_tree), "--out", str(run), "--epochs", "3", "--augment",
                          "none", "--lr", "0.05", *FAST], check=True, capture_output=True)
    out = subprocess.run(cmd + ["eval", str(run), "--workers", "0"], check=True, capture_output=True, text=True)
    assert "top-1 1.0000" in out.stdout
    image = sorted((color_tree / "val" / "n00000002-green_thing").iterdir())[0]
    out = subprocess.run(cmd + ["predict", str(run), str(image)], check=True, capture_output=True, text=True)
    assert out.stdout.splitlines()[1].strip().endswith("green thing")
