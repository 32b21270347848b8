"""Evaluation: top-1, top-5, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.loaders import make_loader
from .data.sources import ImageSet
from .stop import StopRequest, check


@dataclass
class EvalResult:
    top1: float
    top5: float
    num_images: int
    class_names: list[str]
    per_class_accuracy: list[float | None]
    confusion: np.ndarray
    seconds: float = 0.0
    images_per_sec: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    split: str = "val"

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "top1": self.top1,
            "top5": self.top5,
            "num_images": self.num_images,
            "num_classes": len(self.class_names),
            "images_per_sec": self.images_per_sec,
            "seconds": self.seconds,
            "per_class_accuracy": dict(zip(self.class_names, self.per_class_accuracy)),
            "skipped_images": [item for item, _ in self.skipped],
        }

    def write(self, directory: str | Path, name: str = "eval") -> None:
        directory = Path(directory)
        (directory / f"{name}.json").write_text(json.dumps(self.to_dict(), indent=2))
        with (directory / f"{name}_confusion_matrix.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["true \\ predicted", *self.class_names])
            for name_, row in zip(self.class_names, self.confusion.tolist()):
                writer.writerow([name_, *row])
        with (directory / f"{name}_per_class.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "images", "accuracy"])
            for name_, count, acc in zip(self.class_names, self.confusion.sum(1).tolist(), self.per_class_accuracy):
                writer.writerow([name_, count, "" if acc is None else f"{acc:.4f}"])


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalResult:
    num_classes = len(class_names)
    n = len(labels)
    if n == 0:
        return EvalResult(0.0, 0.0, 0, class_names, [None] * num_classes, np.zeros((num_classes, num_classes), int))
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    correct1 = (topk[:, 0] == labels)
    correct5 = (topk == labels[:, None]).any(dim=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), topk[:, 0].numpy()), 1)
    per_class = [
        float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else None for c in range(num_classes)
    ]
    return EvalResult(float(correct1.float().mean()), float(correct5.float().mean()), n, class_names, per_class,
                      confusion)


@dataclass
class Outputs:
    outputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor  # which items of the split (unreadable ones are missing)
    seconds: float
    skipped: list[tuple[str, str]]


@torch.inference_mode()
def compute_outputs(model, images: ImageSet, transform, batch_size: int, workers: int | None, device,
                    forward=None, progress=None) -> Outputs:
    """Run `forward` (default: the model) over a split, in order."""
    forward = forward or model
    model.eval()
    loader = make_loader(images, transform, batch_size, shuffle=False, seed=0, workers=workers)
    outputs, labels, indices, skipped = [], [], [], []
    start = time.perf_counter()
    with StopRequest():
        for batch in loader:
            check()
            skipped.extend(batch.skipped)
            if len(batch.labels):
                outputs.append(forward(batch.images.to(device)).float().cpu())
                labels.append(batch.labels)
                indices.append(batch.indices)
            if progress is not None:
                progress(len(batch.labels) + len(batch.skipped))
    seconds = time.perf_counter() - start
    if not outputs:
        empty = torch.empty(0, dtype=torch.long)
        return Outputs(torch.empty(0), empty, empty, seconds, skipped)
    return Outputs(torch.cat(outputs), torch.cat(labels), torch.cat(indices), seconds, skipped)


def evaluate_model(model, images: ImageSet, transform, batch_size: int = 64, workers: int | None = None,
                   device="cpu", forward=None) -> EvalResult:
    out = compute_outputs(model, images, transform, batch_size, workers, device, forward=forward)
    result = metrics_from_logits(out.outputs, out.labels, images.class_names)
    result.seconds = out.seconds
    result.images_per_sec = result.num_images / out.seconds if out.seconds > 0 else 0.0
    result.skipped = out.skipped
    return result


def run_split(run_dir: str | Path, data: str | None, split: str):
    """A trained run and one split of its data (or of `data`), with the run's classes and split seed."""
    from .config import RunConfig
    from .data.sources import resolve_splits
    from .errors import UserError
    from .run_dir import load_run

    run = load_run(run_dir)
    config = RunConfig.from_yaml(Path(run_dir) / "config.yaml")
    splits = resolve_splits(data or config.data, config.val_fraction, config.seed,
                            None if data else config.val_data, class_ids=run.class_ids,
                            crop_to_box=config.crop_to_box, drop_empty_classes=True, quiet=True,
                            allow_outside_paths=config.allow_outside_paths)
    if split not in splits:
        raise UserError(f"split {split!r} is not in {data or config.data}: available {', '.join(sorted(splits))}")
    return run, splits[split]


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str = "val", batch_size: int = 64,
                 workers: int | None = None) -> EvalResult:
    """Evaluate a trained run on a split of `data` (default: the run's own data); writes eval files."""
    from .data.transforms import eval_transform

    run, images = run_split(run_dir, data, split)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_model(run.model.to(device), images, eval_transform(run.data_config), batch_size,
                            workers, device)
    result.split = split
    result.write(run_dir)
    return result
