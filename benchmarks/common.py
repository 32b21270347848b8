"""Shared benchmark plumbing: data subsets, machine facts, results, BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import timm
import torch

import warmstart
from warmstart.data.imageset import ImageSet
from warmstart.data.sources import resolve_splits

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def imagewoof(quick: bool, train_per_class: int | None = None, val_per_class: int | None = None
              ) -> tuple[dict[str, ImageSet], Path]:
    """imagewoof-mini, whole (1,000 train / 400 val) or a per-class subset for --quick."""
    root = SHARED / "imagewoof-mini"
    if not root.is_dir():
        raise SystemExit(f"{root} is missing: the benchmarks read ../shared/data")
    splits = resolve_splits(str(root), 0.2, 0)
    if quick:
        train_per_class = train_per_class or 20
        val_per_class = val_per_class or 10
    if train_per_class or val_per_class:
        splits = {name: per_class(images, train_per_class if name == "train" else val_per_class)
                  for name, images in splits.items()}
    return splits, root


def per_class(images: ImageSet, count: int | None) -> ImageSet:
    if not count:
        return images
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(images.labels):
        if taken.get(label, 0) < count:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return images.subset(keep)


def write_manifest(images: ImageSet, path: Path) -> Path:
    """A CSV manifest of a subset, so warmstart and the baseline read the same files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        handle.write("image_path,label\n")
        for item, label in zip(images.items, images.labels):
            handle.write(f"{item},{images.class_ids[label]}\n")
    return path


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "warmstart": warmstart.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def images_per_sec(forward, batch, seconds: float) -> float:
    """Images per second of `forward` on `batch`, repeated for about `seconds` after a warm-up."""
    forward(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2))
    return path


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
