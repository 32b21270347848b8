"""Predicting breeds for image files from a run directory alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data.images import open_image
from .data.transforms import eval_transform
from .errors import UserError
from .run_dir import load_run


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first
    error: str | None = None


@torch.inference_mode()
def predict(run_dir: str | Path, images: list[str | Path], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
    """Top-k classes with probabilities for each image; unreadable files get an error, not an exception."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k} is not valid: it must be >= 1")
    run = load_run(run_dir)
    transform = eval_transform(run.data_config)
    results: list[Prediction | None] = [None] * len(images)
    tensors, positions = [], []
    for i, path in enumerate(images):
        if not Path(path).is_file():
            results[i] = Prediction(str(path), [], "file not found")
            continue
        try:
            tensors.append(transform(open_image(path)))
            positions.append(i)
        except Exception as exc:
            results[i] = Prediction(str(path), [], f"not a readable image ({exc.__class__.__name__})")
    k = min(top_k, len(run.class_names))
    for start in range(0, len(tensors), batch_size):
        probs = run.model(torch.stack(tensors[start:start + batch_size])).softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        for row, i in enumerate(positions[start:start + batch_size]):
            top = [(run.class_names[c], float(p)) for p, c in zip(values[row].tolist(), indices[row].tolist())]
            results[i] = Prediction(str(images[i]), top)
    return results
