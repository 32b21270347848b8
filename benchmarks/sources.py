"""Benchmark 16: the same photos as a folder tree, as WebDataset shards (`warmstart data pack`) and
as a Hugging Face parquet dataset (`--data hf:PATH`): the time to list them, the image path's rate
(decode + the training view, one process, the streamed order for shards), the extraction rate and
top-1 of a feature-extractor run on each, and a 2-process torchrun run on the shards against one
process on the same shards."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from warmstart.data import pack
from warmstart.data.loaders import EpochBatches, ImageDataset
from warmstart.data.shards import stream_ids
from warmstart.data.sources import load_source
from warmstart.data.transforms import train_transform

from .common import SHARED, Timer, save

DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 0.875, "crop_mode": "center"}


def _parquet(splits, out: Path) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=splits["train"].class_ids)})
    out.mkdir(parents=True)
    for name, images in splits.items():
        rows = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in images.items], "label": images.labels}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(out / f"{'validation' if name == 'val' else name}-00000-of-00001.parquet"))
    return out


def _image_path_rate(train, count: int) -> float:
    """Decoded training views a second, in the order training reads them (streamed for shards)."""
    dataset = ImageDataset(train, train_transform(DATA_CONFIG, "light"), item_seed=0)
    order = EpochBatches(train.labels, 32, 0, streams=stream_ids(train.items), buffer=5000).order(0)[:count]
    with Timer() as timer:
        for index in order:
            dataset[index]
    return count / timer.seconds


def _train(data: str, out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "warmstart", "train", "--data", data, "--augment", "none", "--seed", "0",
               "--out", str(out), "--quiet", *extra]
    with Timer() as timer:
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    metrics = json.loads((out / "metrics.json").read_text())
    return {"top1": metrics["top1"], "extraction_images_per_sec": metrics["feature_extraction_images_per_sec"],
            "wall_seconds": timer.seconds}


def run(quick: bool = False) -> dict:
    folder = SHARED / "imagewoof-mini"
    count = 200 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="warmstart-sources-") as tmp:
        tmp = Path(tmp)
        listed = {}
        with Timer() as timer:
            spec = pack(str(folder), str(tmp / "wds"), shard_size=250, say=lambda _: None)
        pack_seconds = timer.seconds
        with Timer() as timer:
            _parquet(load_source(str(folder)), tmp / "pq")
        parquet_seconds = timer.seconds
        sources = {"folder": str(folder), "shards": str(spec), "parquet": f"hf:{tmp / 'pq'}"}
        rows = {}
        for name, data in sources.items():
            with Timer() as timer:
                splits = load_source(data)
            listed[name] = timer.seconds
            train = splits["train"]
            rows[name] = {"list_seconds": listed[name], "train_images": len(train),
                          "image_path_images_per_sec": _image_path_rate(train, min(count, len(train)))}
            rows[name].update(_train(data, tmp / f"run-{name}"))
        two = _train(str(spec), tmp / "run-shards-2", "--nproc", "2")
    shards = rows["shards"]
    return save("sources_quick" if quick else "sources", {
        "quick": quick, "command": "python -m benchmarks.run --only sources", "photos": rows["folder"]["train_images"],
        "pack_seconds": pack_seconds, "parquet_seconds": parquet_seconds, "rows": rows,
        "torchrun": {"one_process": {k: shards[k] for k in ("top1", "wall_seconds", "extraction_images_per_sec")},
                     "two_processes": two, "same_top1": bool(np.isclose(two["top1"], shards["top1"]))}})
