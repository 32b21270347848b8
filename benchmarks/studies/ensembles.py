"""Benchmark 8: feature ensembles of the bundled backbones on the hard set (issue #15's `--model
a+b`: kept only if it measurably beats the best single backbone).

Each bundled backbone's features are computed as `--recipe best` computes them (1.3x the input
size, the whole image, bf16, the image and its mirror for validation); then `best`'s head (the
L-BFGS logistic regression with label smoothing, 10 steps, flip TTA) is fitted on each backbone
alone, on the concatenation of several (what `--model a+b` would train), and as separate heads
whose probabilities are averaged. Val top-1 on stanford-dogs-120-dev.

    python -m benchmarks.run --only ensembles
"""

from __future__ import annotations

import itertools
import time

import torch

from warmstart.recipes import recipe_settings
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import data_config_for, eval_transform, mirrored_eval_transform
from warmstart.evaluate import compute_outputs, top1
from warmstart.models import create_model
from warmstart.models.registry import installed_bundled
from warmstart.train.cached import frozen_features
from warmstart.train.probe import fit_probe
from warmstart.train.pull import HeadFit
from warmstart.compute.runtime import Runtime

from ..common import SHARED, per_class, save

BEST = recipe_settings("best")


def features(name: str, splits: dict, runtime: Runtime) -> tuple[dict, float]:
    model, _, _ = create_model(name, len(splits["train"].class_ids), "bundled")
    runtime.prepare(model.eval())
    config = data_config_for(model, crop_pct=BEST["crop_pct"], input_scale=BEST["input_scale"])
    forward = frozen_features(model, name, runtime, config["input_size"])[0]
    start = time.perf_counter()
    views = {"train": (splits["train"], eval_transform(config)), "val": (splits["val"], eval_transform(config)),
             "val-mirror": (splits["val"], mirrored_eval_transform(config))}
    out = {key: compute_outputs(model, images, transform, 64, None, runtime, forward=forward).outputs
           for key, (images, transform) in views.items()}
    return out, time.perf_counter() - start


def val_probabilities(feats: list[dict], train_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`best`'s head on the concatenated features; the flip-averaged val probabilities."""
    x = {k: torch.cat([f[k] for f in feats], 1) for k in ("train", "val", "val-mirror")}
    settings = HeadFit(lr=BEST["lr"], weight_decay=BEST["weight_decay"], steps=BEST["epochs"])  # from zero: no teacher
    head = fit_probe(x["train"], train_labels, None, settings, num_classes,
                     criterion=torch.nn.CrossEntropyLoss(label_smoothing=BEST["label_smoothing"]))
    with torch.no_grad():
        return (head(x["val"]).softmax(1) + head(x["val-mirror"]).softmax(1)) / 2


def run(quick: bool = False) -> dict:
    splits = resolve_splits(str(SHARED / "stanford-dogs-120-dev"), 0.2, 0)
    if quick:
        splits = {k: per_class(v, 5 if k == "train" else 2) for k, v in splits.items()}
    runtime = Runtime(torch.device("cpu"), "bf16", True)
    labels = torch.as_tensor(splits["train"].labels)
    val_labels = torch.as_tensor(splits["val"].labels)
    num_classes = len(splits["train"].class_ids)
    names = installed_bundled()
    feats, seconds = {}, {}
    for name in names:
        feats[name], seconds[name] = features(name, splits, runtime)
        print(f"{name}: features in {seconds[name]:.1f}s", flush=True)
    single = {n: val_probabilities([feats[n]], labels, num_classes) for n in names}
    rows = [{"models": [n], "how": "single", "top1": top1(single[n], val_labels)} for n in names]
    for size in range(2, len(names) + 1):
        for combo in itertools.combinations(names, size):
            concat = val_probabilities([feats[n] for n in combo], labels, num_classes)
            rows.append({"models": list(combo), "how": "concatenated features, one head",
                         "top1": top1(concat, val_labels)})
            rows.append({"models": list(combo), "how": "separate heads, probabilities averaged",
                         "top1": top1(sum(single[n] for n in combo), val_labels)})
    for row in rows:
        row["extraction_seconds"] = sum(seconds[n] for n in row["models"])
        print(f"{'+'.join(row['models'])} ({row['how']}): {row['top1']:.4f}", flush=True)
    best_single = max((r for r in rows if r["how"] == "single"), key=lambda r: r["top1"])
    best_ensemble = max((r for r in rows if r["how"] != "single"), key=lambda r: r["top1"], default=None)
    result = {"quick": quick, "train_images": len(splits["train"]), "val_images": len(splits["val"]), "rows": rows,
              "best_single": best_single, "best_ensemble": best_ensemble,
              "ensemble_wins": best_ensemble is not None and best_ensemble["top1"] > best_single["top1"]}
    save("ensembles_quick" if quick else "ensembles", result)
    return result


if __name__ == "__main__":
    import sys

    run("--quick" in sys.argv)
