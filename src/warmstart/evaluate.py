"""Evaluation: top-1, top-5, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .calibration import expected_calibration_error, negative_log_likelihood
from .data.imageset import ImageSet
from .files import spreadsheet_safe_row
from .run_dir import RunDir, load_run
from .stop import StopRequest, check
from .compute.distributed import Distributed
from .compute.runtime import Runtime


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
    engine: str = ""  # what computed the network's forward (compute/engine.py)
    ece: float = 0.0  # expected calibration error of the probabilities (15 bins)
    nll: float = 0.0  # their negative log-likelihood
    logits: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)

    def scaled(self, temperature: float) -> "EvalResult":
        """The same evaluation of the probabilities softmax(logits / T): top-1 and top-5 unchanged."""
        if self.logits is None or not self.num_images:
            return self
        logits = self.logits / temperature
        return replace(self, logits=logits, ece=expected_calibration_error(logits, self.labels),
                       nll=negative_log_likelihood(logits, self.labels))

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "top1": self.top1,
            "top5": self.top5,
            "ece": self.ece,
            "nll": self.nll,
            "num_images": self.num_images,
            "num_classes": len(self.class_names),
            "images_per_sec": self.images_per_sec,
            "seconds": self.seconds,
            "engine": self.engine,
            "per_class_accuracy": dict(zip(self.class_names, self.per_class_accuracy)),
            "skipped_images": [item for item, _ in self.skipped],
        }

    def write(self, directory) -> None:
        """The split's files in a run directory (see RunDir.evaluation)."""
        summary, confusion, per_class = RunDir(directory).evaluation(self.split)
        summary.write_text(json.dumps(self.to_dict(), indent=2))
        with confusion.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(spreadsheet_safe_row(["true \\ predicted", *self.class_names]))
            for name_, row in zip(self.class_names, self.confusion.tolist()):
                writer.writerow(spreadsheet_safe_row([name_, *row]))
        with per_class.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "images", "accuracy"])
            for name_, count, acc in zip(self.class_names, self.confusion.sum(1).tolist(), self.per_class_accuracy):
                writer.writerow(spreadsheet_safe_row([name_, count, "" if acc is None else f"{acc:.4f}"]))


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose highest logit is the label (0 for no rows): the one top-1."""
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else 0.0


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalResult:
    num_classes = len(class_names)
    n = len(labels)
    if n == 0:
        return EvalResult(0.0, 0.0, 0, class_names, [None] * num_classes, np.zeros((num_classes, num_classes), int))
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    correct5 = (topk == labels[:, None]).any(dim=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), topk[:, 0].numpy()), 1)
    per_class = [
        float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else None for c in range(num_classes)
    ]
    return EvalResult(top1(logits, labels), float(correct5.float().mean()), n, class_names, per_class, confusion,
                      ece=expected_calibration_error(logits, labels), nll=negative_log_likelihood(logits, labels),
                      logits=logits, labels=labels)


@dataclass
class Outputs:
    outputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor  # which items of the split (unreadable ones are missing)
    seconds: float
    skipped: list[tuple[str, str]]


@torch.inference_mode()
def compute_outputs(model, images: ImageSet, transform, batch_size: int, workers: int | None,
                    runtime: Runtime | None = None, forward=None, progress=None) -> Outputs:
    """Run `forward` (default: the model) over a split, in order, on the runtime's device and pipeline."""
    runtime = runtime or Runtime.for_machine()
    model.eval()
    return outputs_of(runtime.loader(images, transform, batch_size, workers), forward or model, runtime.device,
                      progress)


@torch.inference_mode()
def outputs_of(loader, forward, device, progress=None) -> Outputs:
    """`forward` over every batch of a loader (its modules already in eval mode), in order."""
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


def evaluate_model(forward, images: ImageSet, transform, runtime: Runtime, batch_size: int = 64,
                   workers: int | None = None, dist: Distributed | None = None) -> EvalResult:
    """The metrics of `forward` (a network as `Runtime.classify` computes it: device, precision,
    memory format, engine, TTA and temperature) on a split of images in `transform`'s view. Under
    torchrun each rank takes every world-th image and the outputs are gathered: the same result on
    every rank."""
    if dist is None or not dist.active:
        out = outputs_of(runtime.loader(images, transform, batch_size, workers), forward, runtime.device)
        parts = [(out.outputs, out.labels, out.seconds, out.skipped)]
    else:
        shard = images.subset(range(dist.rank, len(images), dist.world))
        out = outputs_of(runtime.loader(shard, transform, batch_size, workers), forward, runtime.device)
        parts = dist.gather((out.outputs, out.labels, out.seconds, out.skipped))
    outputs = [p[0] for p in parts if len(p[1])]
    if outputs and not all(bool(torch.isfinite(o).all()) for o in outputs):
        from .errors import UserError

        raise UserError("the model's outputs are not finite (NaN or infinity): its weights are damaged or its "
                        "training diverged; restore the run from a backup, or train it again")
    result = metrics_from_logits(torch.cat(outputs) if outputs else torch.empty(0), torch.cat([p[1] for p in parts]),
                                 images.class_names)
    result.seconds = max(p[2] for p in parts)
    result.images_per_sec = result.num_images / result.seconds if result.seconds > 0 else 0.0
    result.skipped = [s for p in parts for s in p[3]]
    result.engine = getattr(forward, "engine", "torch")
    return result


def run_split(run_dir: str | Path, data: str | None, split: str):
    """A trained run and one split of its data (or of `data`), with the run's classes and split seed."""
    from .config import RunConfig
    from .data.sources import SourceOptions, resolve_splits
    from .errors import UserError

    run = load_run(run_dir)
    config = RunConfig.from_yaml(RunDir(run_dir).config)
    options = replace(SourceOptions.of(config), drop_empty_classes=True, quiet=True)
    splits = resolve_splits(data or config.data, config.val_fraction, config.seed,
                            None if data else config.val_data, class_ids=run.class_ids, options=options)
    if split not in splits:
        raise UserError(f"split {split!r} is not in {data or config.data}: available {', '.join(sorted(splits))}")
    return run, splits[split]


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str = "val", batch_size: int = 64,
                 workers: int | None = None, engine: str | None = None) -> EvalResult:
    """Evaluate a trained run on a split of `data` (default: the run's own); writes eval files.
    It computes as the run did (device, precision, memory format, pipeline, engine: `engine`
    overrides the run's)."""
    from .data.transforms import eval_transform

    run, images = run_split(run_dir, data, split)
    runtime = Runtime.for_run(run_dir, engine)
    forward = runtime.classify(run.network, run.data_config["input_size"], run.meta.get("tta"),
                               run.meta.get("temperature"), images=len(images))
    result = evaluate_model(forward, images, eval_transform(run.data_config), runtime, batch_size, workers)
    result.split = split
    result.write(run_dir)
    return result
