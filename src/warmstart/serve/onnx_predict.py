"""Predicting image files with any backend (a run directory or an ONNX file); torch-free itself."""

from __future__ import annotations

from pathlib import Path

from ..data.images import ImageTooLarge, open_image
from .backends import OnnxBackend, top_k


def predict_images(backend, images: list, k: int = 5, batch_size: int = 32) -> list:
    """(image, [(class, probability)], error) per image, in order; unreadable files get an error.
    Images are decoded a batch at a time and shrunk to the model's input at once (bounded memory)."""
    results: list = [None] * len(images)
    for start in range(0, len(images), batch_size):
        decoded, positions = [], []
        for i in range(start, min(start + batch_size, len(images))):
            path = images[i]
            if not Path(path).is_file():
                results[i] = (str(path), [], "file not found")
                continue
            try:
                decoded.append(backend.shrink(open_image(path)))
                positions.append(i)
            except ImageTooLarge as exc:
                results[i] = (str(path), [], f"image is {exc}")
            except Exception as exc:
                results[i] = (str(path), [], f"not a readable image ({exc.__class__.__name__})")
        if decoded:
            for i, ranked in zip(positions, top_k(backend.probabilities(decoded), backend.class_names, k)):
                results[i] = (str(images[i]), ranked, None)
    return results


def predict_onnx(model: str | Path, images: list[str], k: int = 5, batch_size: int = 32) -> list:
    """Predictions from an exported ONNX file: onnxruntime, numpy and PIL, no torch."""
    return predict_images(OnnxBackend(model), images, k, batch_size)
