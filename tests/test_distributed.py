"""torchrun data parallelism on the CPU (gloo, 2 processes): one run directory, the same weights
as one process with the same global batch, sharded feature extraction, a failing rank fails the job."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by the inner loop (-m "not slow")

BASE = ["--input-size", "64", "--workers", "0", "--quiet", "--epochs", "2", "--seed", "3"]


def _train(data, out, cwd, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "warmstart", "train", "--data", str(data), "--out", str(out),
                           *BASE, *extra], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_color_tree

    return make_color_tree(tmp_path_factory.mktemp("ddp-data"), 16, 4)


def test_two_processes_match_one_process_with_the_same_global_batch(data, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    two = _train(data, tmp_path / "two", work, "--nproc", "2", "--batch-size", "4", "--no-feature-cache")
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train(data, tmp_path / "one", work, "--batch-size", "8", "--no-feature-cache")
    assert one.returncode == 0, one.stderr[-3000:]
    assert list(work.iterdir()) == []  # nothing written outside --out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "one", "two"]
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not torch.equal(a["classifier.weight"], torch.zeros_like(a["classifier.weight"]))
    import json

    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["val_images"] == 12
    assert "distributed: 2 processes, batch 4 per process (8 per step)" in two.stdout


def test_feature_extraction_is_sharded_across_ranks(data, tmp_path):
    two = _train(data, tmp_path / "two", tmp_path, "--nproc", "2", "--augment", "none")
    assert two.returncode == 0, two.stderr[-3000:]
    shards = sorted(p.name.split("-")[1] for p in (tmp_path / "two" / "cache").glob("train-shard*"))
    assert shards == ["shard0of2", "shard1of2"]
    one = _train(data, tmp_path / "one", tmp_path, "--augment", "none")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert torch.allclose(a["classifier.weight"], b["classifier.weight"], atol=1e-5)


def test_gradual_unfreezing_rebuilds_the_data_parallel_wrapper(data, tmp_path):
    """DDP syncs the gradients of what trained when it was built: the newly unfrozen stage must train too."""
    from warmstart.models import create_model

    two = _train(data, tmp_path / "two", tmp_path, "--nproc", "2", "--batch-size", "4", "--unfreeze-schedule", "1:1",
                 "--optimizer", "adamw", "--lr", "1e-3", "--ema-decay", "0.9")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "epoch 2: now training the last stage and the head" in two.stdout
    trained = load_file(str(tmp_path / "two" / "model.safetensors"))
    pretrained = create_model("efficientnet_lite0", 3, "bundled")[0].state_dict()
    assert not torch.equal(trained["blocks.6.0.conv_pw.weight"], pretrained["blocks.6.0.conv_pw.weight"])
    assert torch.equal(trained["blocks.5.0.conv_pw.weight"], pretrained["blocks.5.0.conv_pw.weight"])


def _pids_with(tag: str, rank: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"WARMSTART_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            found.append(int(entry.name))
    return found


def test_a_failing_rank_fails_the_whole_job(data, tmp_path):
    tag = uuid.uuid4().hex
    env = {**os.environ, "WARMSTART_TEST_TAG": tag}
    process = subprocess.Popen([sys.executable, "-m", "warmstart", "train", "--data", str(data), "--out",
                                str(tmp_path / "run"), "--nproc", "2", "--strategy", "fine-tune", "--batch-size", "2",
                                "--input-size", "96", "--workers", "0", "--quiet", "--epochs", "20"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (tmp_path / "run" / "checkpoints" / "last.pt").exists():
        time.sleep(0.2)
    victims = _pids_with(tag, "1")
    assert victims, "rank 1 not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    start = time.time()
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and time.time() - start < 300
    assert "ChildFailedError" in err or "failed" in err.lower()
    assert not (tmp_path / "run" / "model.safetensors").exists()
