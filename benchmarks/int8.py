"""Benchmark 5b: int8 ONNX on a CPU against fp32 (PyTorch and ONNX), on the same photos and
threads in one run: images/sec at batch 1 and 16, the service's requests/sec and p50/p99 latency
at 8 concurrent clients, val top-1 of each (the export's own gate: fp32 and int8 ONNX on the run's
validation photos), and file sizes.

The runs are `--recipe best` (no refit, so val stays unseen) on the linked trees and feature cache
of benchmarks/pretrained_prior.py: their features are computed once, and the head fits in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import warmstart
from warmstart.data.images import open_image
from warmstart.export import export_run
from warmstart.predict import preprocess
from warmstart.run_dir import load_run

from . import serve_load
from .common import images_per_sec, save
from .pretrained_prior import WORK, data_sets

# Lite2 on imagewoof-mini: its 352-px features of the 120 breeds take half an hour to extract here
RUNS = [("imagewoof-mini", "efficientnet_lite0"), ("stanford-dogs-120-dev", "efficientnet_lite0"),
        ("imagewoof-mini", "efficientnet_lite2")]
SERVED = {("imagewoof-mini", "efficientnet_lite0"), ("imagewoof-mini", "efficientnet_lite2")}
THREADS = 2
ROUNDS = {True: 2, False: 5}  # interleaved speed rounds, quick or not


def _rates(forwards: dict, arrays: np.ndarray, rounds: int, seconds: float) -> dict:
    """Median images/sec of each forward at batch 1 and 16, measured in interleaved rounds (this
    machine's speed drifts by up to 1.5x between seconds; every precision sees the same drift)."""
    seen = {label: {b: [] for b in (1, 16)} for label in forwards}
    for _ in range(rounds):
        for label, forward in forwards.items():
            for b in (1, 16):
                seen[label][b].append(images_per_sec(forward, arrays[:b], seconds))
    return {label: {f"batch {b}": float(np.median(r)) for b, r in by.items()} for label, by in seen.items()}


def _onnx(path: Path, threads: int):
    """An onnxruntime CPU session on `threads` threads (0: its default, every core) as a forward."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


def _forwards(run_dir: Path, fp32: Path, int8: Path) -> dict:
    torch.set_num_threads(THREADS)
    model = load_run(run_dir).model.eval().to(memory_format=torch.channels_last)

    def pytorch(batch):
        with torch.inference_mode():
            return model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))

    return {"fp32 PyTorch": pytorch, "fp32 ONNX": _onnx(fp32, THREADS), "int8 ONNX": _onnx(int8, THREADS)}


def one(name: str, model: str, quick: bool) -> dict:
    data = data_sets(False, (name,), (None,))[0][1]
    out = WORK / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-int8-{name}-{model}"
    run = warmstart.train(warmstart.RunConfig.from_dict({
        "recipe": "best", "refit": False, "model": model, "data": str(data), "quiet": True, "workers": THREADS,
        "out": str(out), "cache_dir": str(WORK / "cache")}))
    # the gate's figures are recorded, not enforced here: whether the default gate (1 point) passes is a result
    exported = export_run(run.run_dir, "onnx", int8=True, calibration=64 if quick else 200, max_int8_drop=100.0)
    gate = exported.int8
    photos = sorted((data / "val").rglob("*.*"))[:16]
    meta = load_run(run.run_dir).export_metadata()
    arrays = np.stack([preprocess(open_image(str(p)), meta) for p in photos])
    rates = _rates(_forwards(run.run_dir, exported.path, gate.path), arrays, ROUNDS[quick], 2.0)
    service = {}
    if (name, model) in SERVED:
        jpegs = [p.read_bytes() for p in sorted((data / "val").rglob("*.*"))[:40]]
        for label, target in (("fp32 PyTorch", run.run_dir), ("fp32 ONNX", exported.path), ("int8 ONNX", gate.path)):
            process, url = serve_load._start(target)
            try:
                serve_load._load(url, jpegs, 2, 2)  # warm-up
                service[label] = serve_load._load(url, jpegs, serve_load.CLIENTS,
                                                  5 if quick else serve_load.REQUESTS_PER_CLIENT)
            finally:
                process.terminate()
                process.wait(timeout=30)
    return {"set": name, "model": model, "input_size": meta["input_size"], "tta": meta["tta"],
            "pytorch_top1": run.metrics["top1"], "fp32_onnx_top1": gate.fp32_top1, "int8_onnx_top1": gate.int8_top1,
            "agreement": gate.agreement, "gate_photos": gate.gate_photos, "quantize_seconds": gate.seconds,
            "mb": {"fp32 ONNX": exported.path.stat().st_size / 2**20, "int8 ONNX": gate.path.stat().st_size / 2**20},
            "images_per_sec": rates, "service": service}


def run(quick: bool = False, models: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite2")) -> dict:
    runs = [one(name, model, quick) for name, model in (RUNS[:1] if quick else RUNS) if model in models]
    result = {"benchmark": "int8 ONNX against fp32 on a CPU", "quick": quick, "threads": THREADS,
              "rounds": ROUNDS[quick],
              "clients": serve_load.CLIENTS, "runs": runs}
    save("int8" + ("_quick" if quick else ""), result)
    return result


def pair(folder: Path, photos: Path, threads: tuple[int, ...] = (THREADS, 0)) -> dict:
    """An exported model.onnx / model.int8.onnx pair on this machine's CPU, without training or
    torch: images/sec at batch 1 and 16 for each thread count (0: onnxruntime's default, all cores).
    For a machine whose CPU differs from the one the runs were made on (a lent GPU machine's)."""
    import onnxruntime as ort

    from warmstart.predict import OnnxBackend

    meta = OnnxBackend(folder / "model.onnx").meta
    arrays = np.stack([preprocess(open_image(str(p)), meta) for p in sorted(photos.rglob("*.JPEG"))[:16]])
    flags = {word for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for word in line.split()}
    result = {"benchmark": "an int8/fp32 ONNX pair on another CPU", "source": folder.name,
              "input_size": meta["input_size"], "tta": meta.get("tta"), "onnxruntime": ort.__version__,
              "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}), "rates": {}}
    for count in threads:
        forwards = {"fp32 ONNX": _onnx(folder / "model.onnx", count),
                    "int8 ONNX": _onnx(folder / "model.int8.onnx", count)}
        result["rates"][f"{count or 'all'} threads"] = _rates(forwards, arrays, 3, 2.0)
        print(count, result["rates"], flush=True)
    save("int8_pair", result)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="int8 ONNX against fp32: python -m benchmarks.run --only int8 "
                                     "runs the whole benchmark; --pair measures an exported pair on this CPU")
    parser.add_argument("--pair", type=Path, required=True, help="a folder with model.onnx and model.int8.onnx")
    parser.add_argument("--photos", type=Path, required=True, help="a folder of JPEGs (the first 16 are used)")
    args = parser.parse_args()
    pair(args.pair, args.photos)
