"""Every label used (--refit) and LP-FT (probe first, keep the best epoch, never end below the probe)."""

import json

import pytest
import torch

from warmstart import RunConfig, evaluate, train
from warmstart.run_dir import load_run


def _with_test_split(color_tree):
    (color_tree / "val").rename(color_tree / "test")  # train/ and test/: validation is carved from train
    return color_tree


@pytest.mark.slow
def test_refit_trains_on_train_plus_val_reusing_the_cached_features(color_tree, tmp_path, capsys):
    root = _with_test_split(color_tree)
    base = dict(data=str(root), recipe="linear-probe", val_fraction=0.25, input_size=64, workers=0, quiet=True)
    chosen = train(RunConfig(**base, refit=False, out=str(tmp_path / "chosen")))
    capsys.readouterr()
    refitted = train(RunConfig(**base, out=str(tmp_path / "refit"), cache_dir=str(tmp_path / "chosen" / "cache")))
    out = capsys.readouterr().out
    m = refitted.metrics
    assert m["refit"] and m["refit_train_images"] == 36 and m["refit_epochs"] == 10
    assert m["top1"] == chosen.metrics["top1"]  # val top-1 is the selection run's, not of a model trained on val
    assert "refit: training again on train + val (36 images)" in out and "saved: refit on train + val" in out
    assert "features of 9 val images from the cache" in out  # val's view was not computed again
    a, b = (load_run(r.run_dir).network.get_classifier().weight for r in (chosen, refitted))
    assert not torch.allclose(a, b)  # the saved head saw 9 more images
    assert m["test_top1"] == pytest.approx(evaluate(refitted.run_dir, split="test").top1)
    assert json.loads((refitted.run_dir / "metrics.json").read_text())["refit_train_images"] == 36


def test_refit_leaves_a_val_split_of_its_own_alone(color_tree, tmp_path, capsys):
    result = train(RunConfig(data=str(color_tree), recipe="linear-probe", input_size=64, workers=0, quiet=True,
                             out=str(tmp_path / "run")))
    assert "refit" not in result.metrics
    assert "validation is a split of its own" in capsys.readouterr().out


@pytest.mark.slow
def test_lp_ft_never_ends_below_its_probe(color_tree, tmp_path, capsys):
    root = _with_test_split(color_tree)
    # a learning rate that wrecks the network: every fine-tuned epoch scores below the probe
    result = train(RunConfig(data=str(root), recipe="lp-ft", val_fraction=0.25, input_size=64, workers=0, quiet=True,
                             epochs=2, warmup_epochs=0, lr=3.0, batch_size=9, out=str(tmp_path / "lpft")))
    out = capsys.readouterr().out
    probe = float(out.split("probe (LP-FT's first stage): val top-1 ")[1].split(";")[0])
    assert result.metrics["top1"] >= probe
    assert "kept epoch 0 (the probe it started from)" in out
    assert result.metrics["refit_epochs"] == 0 and "(the probe alone)" in out
    assert all(h["val_top1"] < probe for h in result.history)
