"""benchmarks/gpu.py waits for a GPU that is lent only now and then, for minutes: its smoke run on
the CPU (a few photos, a tiny network) proves the script runs end to end before it gets one."""

import sys
from pathlib import Path

import pytest

from conftest import require_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_on_a_cpu(tmp_path, monkeypatch):
    from benchmarks import common, gpu, run

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = gpu.run(require_shared("imagewoof-mini"), workers=0, batch=16, smoke=True)  # (workers: other tests)
    assert (tmp_path / "gpu_smoke.json").is_file()
    assert result["train_rows"] == 40 and result["val_images"] == 20
    assert "errors" not in result, result.get("errors")  # a failing row is recorded, not raised: none here
    for row in ("warmstart_pipeline_only", "plain_fine_tune", "warmstart_fine_tune", "warmstart_fine_tune_cpu_pipeline",
                "warmstart_fine_tune_image_cache"):
        assert result[row]["images_per_sec"] > 0
    assert 0 <= result["warmstart_frozen"]["top1"] <= 1 and result["warmstart_frozen"]["head_seconds"] > 0
    assert set(result["targets"]) >= {"fine_tune_4000_img_s", "frozen_8x", "extraction_8000_img_s"}
    rendered = "\n".join(run._gpu({**result, "machine": common.machine()}))
    assert "full fine-tune img/s" in rendered and "frozen backbone, 10 epochs" in rendered
