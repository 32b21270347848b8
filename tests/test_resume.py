"""Never lose a run: checkpoints, exact resume after SIGKILL, SIGTERM/Ctrl-C, truncated checkpoints."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from warmstart import RunConfig, train
from warmstart.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by the inner loop (-m "not slow")

ARGS = ["--strategy", "fine-tune", "--augment", "standard", "--epochs", "4", "--batch-size", "4", "--input-size",
        "64", "--workers", "0", "--checkpoint-every", "2", "--lr", "0.02", "--seed", "5", "--quiet"]


def _start(color_tree, out):
    return subprocess.Popen([sys.executable, "-m", "warmstart", "train", "--data", str(color_tree), "--out", str(out),
                             *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed_at(root, run, step: int) -> None:
    """A training process SIGKILLed once it has checkpointed `step`."""
    process = _start(root, run)
    _wait_for_step(run, process, step)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _wait_for_step(run, process, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = run / "checkpoints" / "last.pt"
        if last.exists():
            try:
                state = torch.load(last, weights_only=True)
            except Exception:  # being replaced at this moment: look again
                state = {"global_step": -1}
            if state["global_step"] >= step:
                return
        if process.poll() is not None:
            pytest.fail(f"training ended before step {step}: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("no checkpoint in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import make_color_tree

    root = make_color_tree(tmp_path_factory.mktemp("resume-data"), 12, 4)
    out = tmp_path_factory.mktemp("ref") / "run"
    code = main(["train", "--data", str(root), "--out", str(out), *ARGS])
    assert code == 0
    return root, load_file(str(out / "model.safetensors")), (out / "history.csv").read_text()


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(reference, tmp_path):
    root, expected, history = reference
    run = tmp_path / "run"
    _killed_at(root, run, 12)  # 9 steps per epoch: in the middle of the second epoch
    assert not (run / "model.safetensors").exists()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] < 36
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert _same_weights(load_file(str(run / "model.safetensors")), expected)
    assert (run / "history.csv").read_text().count("\n") == history.count("\n")


def test_truncated_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    root, expected, _ = reference
    run = tmp_path / "run"
    _killed_at(root, run, 14)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn write on disk
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "unreadable" in capsys.readouterr().out
    assert _same_weights(load_file(str(run / "model.safetensors")), expected)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference, tmp_path):
    root, expected, _ = reference
    run = tmp_path / "run"
    process = _start(root, run)
    _wait_for_step(run, process, 6)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "continue with: warmstart train --resume" in err and "Traceback" not in err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert _same_weights(load_file(str(run / "model.safetensors")), expected)


def test_resume_refuses_a_changed_config_unless_weights_only(reference, tmp_path, capsys):
    root, _, _ = reference
    run = tmp_path / "run"
    _killed_at(root, run, 4)
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "settings differ from its checkpoint's (lr 0.02 -> 0.5)" in err and "drop those flags" not in err, err
    new = tmp_path / "new"
    assert main(["train", "--resume", str(run), "--resume-weights-only", "--lr", "0.5", "--epochs", "1",
                 "--out", str(new), "--quiet"]) == 0
    assert (new / "model.safetensors").exists() and not (run / "model.safetensors").exists()


def test_best_and_last_checkpoints_are_kept(reference, tmp_path):
    root, _, _ = reference
    result = train(RunConfig(data=str(root), strategy="fine-tune", epochs=2, batch_size=8, input_size=64, workers=0,
                             quiet=True, out=str(tmp_path / "run")))
    folder = result.run_dir / "checkpoints"
    assert {p.name for p in folder.iterdir()} == {"last.pt", "previous.pt", "best.pt"}
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["best_top1"] == max(h["val_top1"] for h in result.history)


def test_a_stop_between_two_epochs_points_at_the_checkpoint_and_resumes_exactly(reference, tmp_path, capsys):
    """A signal that lands after an epoch's checkpoint and before the next epoch's first batch (or
    while validating) is a stop with a checkpoint: `--resume` continues from it (the CI once saw
    SIGTERM land there and the run say only that its feature cache was kept)."""
    from warmstart import stop
    from warmstart.train.checkpoint import TrainingInterrupted

    root, expected, _ = reference
    run = tmp_path / "run"
    config = RunConfig.from_dict({"data": str(root), "out": str(run), "strategy": "fine-tune", "augment": "standard",
                                  "epochs": 4, "batch_size": 4, "input_size": 64, "workers": 0,
                                  "checkpoint_every": 2, "lr": 0.02, "seed": 5, "quiet": True})

    def signal_after_the_first_epoch(record):
        if record["epoch"] == 1:
            stop._handle(signal.SIGTERM, None)  # as the signal handler does

    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, on_epoch=signal_after_the_first_epoch)
    assert stopped.value.checkpoint == run / "checkpoints" / "last.pt"
    assert torch.load(stopped.value.checkpoint, weights_only=True)["epoch"] == 1
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert _same_weights(load_file(str(run / "model.safetensors")), expected)
