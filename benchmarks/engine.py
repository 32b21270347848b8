"""Benchmark 14: the inference engine (compute/engine.py), onnxruntime against PyTorch, interleaved
in one run on this machine.

    python -m benchmarks.run --only engine [--quick]

1. The frozen network's standalone forward (pooled features, batch 32, the machine's threads, the
   median of interleaved rounds): PyTorch as warmstart ran it before (folded BatchNorm,
   channels_last) against onnxruntime on the exported graph; the largest feature difference.
2. `warmstart train --recipe best` end to end (the CLI in a subprocess, wall, user and system CPU
   time), per engine, alternated: Lite0 on imagewoof-mini, Lite2 on stanford-dogs-120-dev; each
   engine's extraction rate and val top-1. The graphs are exported first (as on every run after a
   model's first; the export's time is reported).
3. `warmstart eval RUN` and `warmstart predict RUN` on 400 photos, per engine."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from warmstart.compute.runtime import Runtime
from warmstart.models import create_model
from warmstart.train.cached import frozen_features

from .common import SHARED, images_per_sec, save

NETWORKS = [("efficientnet_lite0", "bundled", 288), ("efficientnet_lite2", "bundled", 352), ("resnet50", "none", 224)]
BATCH = 32  # as extraction hands batches over (onnxruntime runs them engine.CHUNK images at a time)
ENGINES = ("torch", "onnxruntime")


def _runtime(engine: str) -> Runtime:
    return Runtime(torch.device("cpu"), "fp32", True, "cpu", engine, engine, "benchmark")


def standalone(name: str, weights: str, size: int, rounds: int, seconds: float) -> dict:
    model, _, arch = create_model(name, 10, weights)
    model.eval()
    forwards, setup = {}, {}
    for engine in ENGINES:  # onnxruntime's: the graph exported into a fresh cache (its one-time cost)
        start = time.perf_counter()
        forwards[engine] = frozen_features(model, arch, _runtime(engine), (3, size, size), lambda line: None)[0]
        setup[engine] = time.perf_counter() - start
    images = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        outputs = {engine: forward(images) for engine, forward in forwards.items()}
        seen = {engine: [] for engine in ENGINES}
        for _ in range(rounds):
            for engine, forward in forwards.items():
                seen[engine].append(images_per_sec(forward, images, seconds))
    rates = {engine: float(np.median(r)) for engine, r in seen.items()}
    difference = float((outputs["torch"] - outputs["onnxruntime"]).abs().max())
    return {"model": name, "input_size": size, "batch": BATCH, "images_per_sec": rates,
            "ratio": rates["onnxruntime"] / rates["torch"], "max_feature_difference": difference,
            "relative_difference": difference / float(outputs["torch"].abs().max()),
            "export_seconds": setup["onnxruntime"]}


def _cli(args: list[str]) -> dict:
    """A warmstart command in a subprocess: its output, wall time, and user and system CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "warmstart", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"warmstart {' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    return {"output": done.stdout + done.stderr, "wall_seconds": wall,
            "user_seconds": after.ru_utime - before.ru_utime, "system_seconds": after.ru_stime - before.ru_stime}


def _rate(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def best_runs(label: str, data: Path, model: str, work: Path, repeats: int, extra: list[str]) -> dict:
    """`--recipe best` per engine, alternated `repeats` times (after one run that exports the graph)."""
    first = _cli(["train", "--data", str(data), "--recipe", "best", "--model", model, "--engine", "onnxruntime",
                  "--out", str(work / f"{label}-export"), "--quiet", *extra])
    export = _rate(r"exported .* in ([\d.]+)s", first["output"])
    runs = {engine: [] for engine in ENGINES}
    for repeat in range(repeats):
        for engine in ENGINES:
            out = work / f"{label}-{engine}-{repeat}"
            done = _cli(["train", "--data", str(data), "--recipe", "best", "--model", model, "--engine", engine,
                         "--out", str(out), "--quiet", *extra])
            metrics = json.loads((out / "metrics.json").read_text())
            runs[engine].append({"wall_seconds": done["wall_seconds"], "user_seconds": done["user_seconds"],
                                 "system_seconds": done["system_seconds"], "top1": metrics["top1"],
                                 "extraction_images_per_sec": _rate(r"feature extraction ([\d.]+) img/s",
                                                                    done["output"]),
                                 "run": str(out)})
    medians = {engine: {key: float(np.median([r[key] for r in rows])) for key in rows[0] if key != "run"}
               for engine, rows in runs.items()}
    return {"set": label, "model": model, "export_seconds": export, "runs": runs, "medians": medians,
            "end_to_end_ratio": medians["torch"]["wall_seconds"] / medians["onnxruntime"]["wall_seconds"],
            "extraction_ratio": medians["onnxruntime"]["extraction_images_per_sec"]
            / medians["torch"]["extraction_images_per_sec"],
            "same_top1": all(r["top1"] == runs["torch"][0]["top1"] for rows in runs.values() for r in rows),
            "top1_difference_points": 100 * (medians["onnxruntime"]["top1"] - medians["torch"]["top1"])}


def uses(run: str, photos: list[str], repeats: int) -> dict:
    """`eval RUN` (its 400 val photos) and `predict RUN` on the same photos, per engine, alternated."""
    seen = {f"{command} {engine}": [] for command in ("eval", "predict") for engine in ENGINES}
    top1 = {}
    for _ in range(repeats):
        for engine in ENGINES:
            done = _cli(["eval", run, "--engine", engine, "--json"])
            seen[f"eval {engine}"].append(done["wall_seconds"])
            top1[engine] = json.loads(done["output"][done["output"].index("{"):])["top1"]
            seen[f"predict {engine}"].append(_cli(["predict", run, *photos, "--engine", engine])["wall_seconds"])
    seconds = {key: float(np.median(v)) for key, v in seen.items()}
    return {"photos": len(photos), "seconds": seconds, "top1": top1,
            "eval_ratio": seconds["eval torch"] / seconds["eval onnxruntime"],
            "predict_ratio": seconds["predict torch"] / seconds["predict onnxruntime"]}


def run(quick: bool = False) -> dict:
    rounds, seconds, repeats = (2, 1.0, 1) if quick else (5, 3.0, 2)
    work = Path(tempfile.mkdtemp(prefix="warmstart-engine-bench-"))
    os.environ.setdefault("WARMSTART_ENGINE_CACHE", str(work / "engines"))  # a fresh cache: the export is timed
    result = {"benchmark": "inference engine", "quick": quick, "threads": torch.get_num_threads(),
              "command": "python -m benchmarks.run --only engine" + (" --quick" if quick else ""),
              "standalone": [standalone(*network, rounds, seconds) for network in NETWORKS[:1 if quick else 3]]}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    woof = SHARED / "imagewoof-mini"
    result["best"] = [best_runs("imagewoof-mini", woof, "efficientnet_lite0", work, repeats, [])]
    if not quick:
        result["best"].append(best_runs("stanford-dogs-120-dev", SHARED / "stanford-dogs-120-dev", "efficientnet_lite2",
                                        work, 1, []))
    photos = sorted(str(p) for p in (woof / "val").rglob("*.JPEG"))
    result["uses"] = uses(result["best"][0]["runs"]["onnxruntime"][0]["run"], photos[:100 if quick else 400], repeats)
    save("engine" + ("_quick" if quick else ""), result)
    return result
