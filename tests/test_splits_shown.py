"""What a user sees of the splits: where validation came from, test next to val wherever there is a
test split, runs listed with their recipe and how they trained, one evaluation file per split."""

import json

import pytest

from warmstart import RunConfig, evaluate, train
from warmstart.cli import main
from warmstart.data.sources import describe_splits, resolve_splits


def _train_and_test(color_tree):
    (color_tree / "val").rename(color_tree / "test")  # train/ and test/, no val/
    return color_tree


def test_the_data_line_names_all_three_splits_and_where_val_came_from(color_tree):
    root = _train_and_test(color_tree)
    assert describe_splits(resolve_splits(str(root), 0.25, 0)) == \
        "27 train / 9 val (25% of train, seeded) / 12 test images, 3 classes"
    assert describe_splits(resolve_splits(str(root), 0.0, 0)) == \
        "36 train / no validation (--val-fraction 0: the last epoch is kept) / 12 test images, 3 classes"


@pytest.mark.slow
def test_test_top1_stands_beside_val_and_runs_show_recipe_and_path(color_tree, tmp_path, capsys):
    root = _train_and_test(color_tree)
    result = train(RunConfig(data=str(root), recipe="linear-probe", val_fraction=0.25, input_size=64, workers=0,
                             quiet=True, out=str(tmp_path / "runs" / "probe")))
    out = capsys.readouterr().out
    assert "data: 27 train / 9 val (25% of train, seeded) / 12 test images" in out
    last = out.strip().splitlines()[-1]
    assert f"val top-1 {result.metrics['top1']:.4f}" in last and f"test top-1 {result.metrics['test_top1']:.4f}" in last
    assert result.metrics["training_path"] == "cached features (L-BFGS)"
    assert main(["runs", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "recipe" in table[0] and "val top-1" in table[0] and "test top-1" in table[0]
    assert "linear-probe" in table[1] and "cached features (L-BFGS)" in table[1]
    assert f"{result.metrics['test_top1']:.4f}" in table[1]
    # one evaluation file per split: evaluating test leaves val's as it was
    val_before = (result.run_dir / "eval.json").read_text()
    tested = evaluate(result.run_dir, split="test")
    assert json.loads((result.run_dir / "eval_test.json").read_text())["top1"] == tested.top1
    assert (result.run_dir / "eval.json").read_text() == val_before


def test_no_validation_split_keeps_the_last_epoch_and_says_so(color_tree, tmp_path, capsys):
    root = _train_and_test(color_tree)
    result = train(RunConfig(data=str(root), augment="none", epochs=2, val_fraction=0, input_size=64, workers=0,
                             quiet=True, out=str(tmp_path / "runs" / "all")))
    out = capsys.readouterr().out
    assert "no validation (--val-fraction 0: the last epoch is kept)" in out
    assert result.metrics["top1"] is None and result.metrics["train_images"] == 36
    assert "no validation split (the last epoch is kept)" in out.strip().splitlines()[-1]
    assert all("val_top1" not in h for h in result.history) and len(result.history) == 2
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert f"{result.metrics['test_top1']:.4f}" in capsys.readouterr().out
