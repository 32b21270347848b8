"""The learning-rate finder: an exponential sweep, a smoothed loss, a suggestion inside it, a plot."""

import csv
import math

import numpy as np

from warmstart import RunConfig
from warmstart.cli import main
from warmstart.train.lr_find import lr_find, suggest_lr


def test_suggestion_is_where_the_loss_falls_fastest():
    lrs = list(np.logspace(-6, 1, 80))
    # a loss that falls steepest at 1e-3 (log-space logistic), then blows up past 1e-1
    losses = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) + (5 * (lr - 0.1) if lr > 0.1 else 0)
              for lr in lrs]
    suggestion = suggest_lr(lrs, losses)
    assert 10 ** -3.2 < suggestion < 10 ** -2.8
    assert suggest_lr(lrs[:2], losses[:2]) is None


def test_lr_find_sweeps_suggests_inside_the_sweep_and_plots(color_tree, tmp_path, capsys):
    config = RunConfig(data=str(color_tree), out=str(tmp_path / "find"), batch_size=8, input_size=64, workers=0,
                       quiet=True, augment="none", optimizer="sgd")
    result = lr_find(config, start_lr=1e-5, end_lr=100.0, steps=40)
    assert len(result.lrs) >= 20 and result.lrs[0] == 1e-5
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))  # exponential growth
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    # the colour classes are learnable: the smoothed loss falls below its start before the suggestion's end
    assert min(result.smoothed) < result.smoothed[0] * 0.9
    png = (tmp_path / "find" / "lr_find.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = list(csv.DictReader((tmp_path / "find" / "lr_find.csv").open()))
    assert len(rows) == len(result.lrs) and float(rows[0]["lr"]) == 1e-5
    # the command prints the flag to pass to train
    code = main(["lr-find", "--data", str(color_tree), "--out", str(tmp_path / "cli"), "--batch-size", "8",
                 "--input-size", "64", "--workers", "0", "--quiet", "--steps", "20", "--start-lr", "1e-4"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and printed.startswith("--lr ") and 1e-4 <= float(printed.split()[1]) <= 10
