"""Benchmark 6: each --recipe's val top-1 and wall time, beside a plain logistic-regression probe on
frozen features measured in the same run, on imagewoof-mini and stanford-dogs-4breeds.

The probe is what a careful user writes by hand: the bundled EfficientNet-Lite0 in eval mode at its
pretrained preprocessing (224 px, center crop), fp32 features of every image once, then
scikit-learn's LogisticRegression with its defaults (C=1, L-BFGS). Its time is extraction + fit.
Each recipe is one `warmstart.train` call (bf16 autocast, the machine's fast path) with its own
empty cache, timed from the call to the saved, evaluated run. Both read the same split (CSV
manifests). Whole-network recipes (fine-tune, gradual) take minutes per epoch on a CPU: they run
with fewer epochs here (stated in the table), so their numbers are a floor, not their accuracy.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

import warmstart
from warmstart.data.loaders import ImageDataset, collate_skipping, default_workers
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import data_config_for, eval_transform
from warmstart.models import create_model
from warmstart.recipes import RECIPES

from .common import SHARED, per_class, save, write_manifest

# recipe -> settings changed for a CPU benchmark (whole-network epochs cost minutes here)
CPU_EPOCHS = {"fine-tune": {"epochs": 2, "warmup_epochs": 0},
              "gradual": {"epochs": 3, "unfreeze_schedule": ["1:2", "2:all"]}}
TARGET_POINTS, TARGET_TIME_RATIO = 2.0, 5.0


def target_met(best: dict) -> bool:
    """At least TARGET_POINTS above the probe (top-1 is a float32 ratio: 8 photos of 400 read 1.999998) in
    at most TARGET_TIME_RATIO x its time."""
    return round(best["top1_minus_probe_points"], 2) >= TARGET_POINTS and best["time_vs_probe"] <= TARGET_TIME_RATIO


def datasets(quick: bool) -> dict[str, dict]:
    woof = resolve_splits(str(SHARED / "imagewoof-mini"), 0.2, 0)
    dogs = resolve_splits(str(SHARED / "stanford-dogs-4breeds" / "Images"), 0.2, 0)  # seeded stratified split
    out = {"imagewoof-mini": woof, "stanford-dogs-4breeds": dogs}
    if quick:
        out = {name: {k: per_class(v, 12 if k == "train" else 6) for k, v in splits.items()}
               for name, splits in out.items()}
    return out


def probe(splits) -> dict:
    start = time.perf_counter()
    model, _, _ = create_model("efficientnet_lite0", len(splits["train"].class_ids), "bundled")
    model.eval()
    transform = eval_transform(data_config_for(model))

    def features(images):
        loader = DataLoader(ImageDataset(images, transform), batch_size=64, num_workers=default_workers(),
                            collate_fn=collate_skipping)
        rows, labels = [], []
        with torch.inference_mode():
            for batch in loader:
                rows.append(model.forward_head(model.forward_features(batch.images), pre_logits=True))
                labels.append(batch.labels)
        return torch.cat(rows).numpy(), torch.cat(labels).numpy()

    x_train, y_train = features(splits["train"])
    x_val, y_val = features(splits["val"])
    extracted = time.perf_counter() - start
    classifier = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    top1 = float(np.mean(classifier.predict(x_val) == y_val))
    return {"top1": top1, "seconds": time.perf_counter() - start, "extraction_seconds": extracted}


def recipe_run(name: str, data_dir: Path, work: Path) -> dict:
    settings = {"recipe": name, "data": str(data_dir), "precision": "bf16", "quiet": True, "allow_outside_paths": True,
                "out": str(work / name), "cache_dir": str(work / f"cache-{name}"), **CPU_EPOCHS.get(name, {})}
    start = time.perf_counter()
    result = warmstart.train(warmstart.RunConfig.from_dict(settings))
    seconds = time.perf_counter() - start
    return {"top1": result.metrics["top1"], "seconds": seconds, "epochs": result.metrics["epochs"],
            "changed_for_cpu": CPU_EPOCHS.get(name, {})}


def run(quick: bool = False) -> dict:
    results = {}
    for dataset, splits in datasets(quick).items():
        work = Path(tempfile.mkdtemp(prefix="ws-bench-recipes-"))
        try:
            write_manifest(splits["train"], work / "data" / "train.csv")
            write_manifest(splits["val"], work / "data" / "val.csv")
            baseline = probe(splits)
            print(f"{dataset}: probe {baseline['top1']:.4f} in {baseline['seconds']:.1f}s", flush=True)
            runs = {}
            for name in RECIPES:
                runs[name] = recipe_run(name, work / "data", work)
                runs[name]["top1_minus_probe_points"] = 100 * (runs[name]["top1"] - baseline["top1"])
                runs[name]["time_vs_probe"] = runs[name]["seconds"] / baseline["seconds"]
                print(f"{dataset}: {name} {runs[name]['top1']:.4f} in {runs[name]['seconds']:.1f}s", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        best = runs["best"]
        results[dataset] = {
            "train_images": len(splits["train"]), "val_images": len(splits["val"]), "probe": baseline,
            "recipes": runs,
            "target_met": target_met(best),
        }
    result = {"quick": quick, "datasets": results, "target": {"points": TARGET_POINTS, "time_ratio": TARGET_TIME_RATIO}}
    save("recipes_quick" if quick else "recipes", result)
    return result


if __name__ == "__main__":
    import sys

    run("--quick" in sys.argv)
