"""Predicting breeds for image files from a run directory alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .serve.backends import TorchBackend
from .serve.onnx_predict import predict_images


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first
    error: str | None = None


def predict(run_dir: str | Path, images: list[str | Path], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
    """Top-k classes with probabilities for each image; unreadable files get an error, not an exception."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k} is not valid: it must be >= 1")
    return [Prediction(*p) for p in predict_images(TorchBackend(run_dir), list(images), top_k, batch_size)]
