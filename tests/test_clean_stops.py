"""Every phase stops cleanly on SIGTERM or Ctrl-C: within seconds, keeping what is done, with exit
code 143/130 and one line instead of a traceback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from warmstart import RunConfig, train
from warmstart.data.feature_cache import DONE
from warmstart.evaluate import compute_outputs
from warmstart.stop import Stopped

from conftest import make_color_tree

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by the inner loop (-m "not slow")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "warmstart", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(pattern: str, folder: Path, process: subprocess.Popen, seconds: float = 60) -> Path:
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{pattern} did not appear in {folder}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_feature_extraction_stops_within_seconds_and_keeps_the_rows(tmp_path, signum):
    root = make_color_tree(tmp_path / "colors", 64, 4)  # 192 images at 224 px: a few seconds to extract
    out = tmp_path / "run"
    command = ["train", "--data", str(root), "--workers", "0", "--quiet", "--augment", "none", "--epochs", "2",
               "--out", str(out)]
    process = _start(command)
    status = _wait_for("cache/train-*/status.npy", out, process)
    time.sleep(0.5)
    process.send_signal(signum)
    sent = time.time()
    _, err = process.communicate(timeout=30)
    assert time.time() - sent < 10
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and f"interrupted by {signal.Signals(signum).name}" in err, err
    assert f"--out {out}" in err  # says how to continue
    kept = int((np.load(status) == DONE).sum())
    assert 0 < kept < 192
    if signum == signal.SIGTERM:  # the same command again continues: the kept rows are not computed again
        again = subprocess.run([sys.executable, "-m", "warmstart", *command], capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert f"features of {192 - kept} train images" in again.stdout, again.stdout


def _signal_self_after(calls: int):
    """A callback that sends SIGTERM to this process on its `calls`-th call."""
    seen = {"n": 0}

    def callback(*args):
        seen["n"] += 1
        if seen["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return args[0] if args else None

    return callback


def test_evaluation_stops_at_the_next_batch(color_tree, lite0):
    from warmstart.data.sources import resolve_splits
    from warmstart.data.transforms import data_config_for, eval_transform

    images = resolve_splits(str(color_tree), 0.2, 0)["train"]
    forward = _signal_self_after(2)
    with pytest.raises(Stopped) as stopped:
        compute_outputs(lite0, images, eval_transform(data_config_for(lite0, 64)), 4, 0,
                        forward=lambda x: forward(lite0(x)))
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


def test_head_training_stops_at_the_next_step_with_the_run_directory_kept(color_tree, tmp_path):
    stop_after_first_epoch = _signal_self_after(1)
    with pytest.raises(Stopped) as stopped:
        train(RunConfig(data=str(color_tree), augment="none", epochs=5, input_size=64, workers=0, quiet=True,
                        out=str(tmp_path / "run")), on_epoch=stop_after_first_epoch)
    assert stopped.value.signum == signal.SIGTERM
    assert "continue with the same command and --out" in stopped.value.kept
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # the same run directory is taken up again, its cached features reused
    result = train(RunConfig(data=str(color_tree), augment="none", epochs=2, input_size=64, workers=0, quiet=True,
                             out=str(tmp_path / "run")))
    assert result.metrics["features_from_cache"]


def test_a_signal_during_a_tune_trial_exits_143_and_the_study_resumes(color_tree, tmp_path, monkeypatch, capsys):
    import yaml

    from warmstart.cli import main
    from warmstart.train import head

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": str(color_tree), "input_size": 64, "workers": 0,
                                                        "epochs": 2, "augment": "none", "batch_size": 8}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"lr": {"low": 1e-3, "high": 1e-1, "log": True}}))
    command = ["tune", "--config", str(tmp_path / "base.yaml"), "--space", str(tmp_path / "space.yaml"),
               "--trials", "2", "--study-dir", str(tmp_path / "study"), "--quiet"]
    record = head.epoch_record
    signal_once = _signal_self_after(1)
    monkeypatch.setattr(head, "epoch_record", lambda *a: signal_once(record(*a)))
    assert main(command) == 143
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.setattr(head, "epoch_record", record)
    assert main(command) == 0
    table = (tmp_path / "study" / "trials.csv").read_text()
    assert table.count("complete") == 2 and table.count("fail") == 1
