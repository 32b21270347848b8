"""Predicting classes of image files: from a run directory (PyTorch) or an exported ONNX file
(onnxruntime, numpy and PIL only: this module needs no torch on that path), one batch of images
in memory at a time. The service (`warmstart serve`) answers with the same backends."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data.images import ImageTooLarge, open_image
from .errors import UserError
from .files import not_a_file

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def shrink(image: Image.Image, meta: dict) -> Image.Image:
    """The evaluation view's first step: the short side resized to size / crop_pct (a no-op on an
    image already that size, so a server can shrink uploads as soon as they are decoded)."""
    size = int(meta["input_size"][-1])
    scale = math.floor(size / meta["crop_pct"])
    width, height = image.size
    if width <= height:
        new = (scale, int(scale * height / width))
    else:
        new = (int(scale * width / height), scale)
    return image.resize(new, _RESAMPLE.get(meta["interpolation"], Image.BICUBIC))


def preprocess(image: Image.Image, meta: dict) -> np.ndarray:
    """The evaluation view in numpy: resize the short side to size / crop_pct, center crop,
    scale to [0, 1], normalise. Matches timm's evaluation transform on PIL images."""
    size = int(meta["input_size"][-1])
    image = shrink(image, meta)
    new = image.size
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(meta["mean"], dtype=np.float32)) / np.asarray(meta["std"], dtype=np.float32)
    return array.transpose(2, 0, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OnnxBackend:
    def __init__(self, path: str | Path):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist: pass an ONNX file written by 'warmstart export'")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{path} is not a readable ONNX model ({exc.__class__.__name__})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in props:
            raise UserError(f"{path} carries no warmstart metadata: export it with 'warmstart export RUN --format onnx'")
        self.meta = {k: json.loads(v) for k, v in props.items()}
        self.input_name = self.session.get_inputs()[0].name
        self.class_names = self.meta["class_names"]

    def shrink(self, image: Image.Image) -> Image.Image:
        return shrink(image, self.meta)

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([preprocess(image, self.meta) for image in images])
        return softmax(self.session.run(None, {self.input_name: batch})[0])


class TorchBackend:
    """A run directory: its network computed as the run computes (the run's engine, or `engine`)."""

    def __init__(self, run_dir: str | Path, engine: str | None = None, images: int | None = None):
        import torch

        from .compute.runtime import Runtime
        from .data.transforms import eval_transform
        from .run_dir import load_run

        self.torch = torch
        self.run = load_run(run_dir)
        self.runtime = Runtime.for_run(run_dir, engine)  # as the run computed: device, precision, engine
        self.forward = self.runtime.classify(self.run.network, self.run.data_config["input_size"],
                                             self.run.meta.get("tta"), self.run.meta.get("temperature"),
                                             images=images)  # how many it will see (None: a service, many)
        self.engine = self.forward.engine
        self.transform = eval_transform(self.run.data_config)
        self.meta = self.run.export_metadata()
        self.class_names = self.run.class_names

    def shrink(self, image: Image.Image) -> Image.Image:
        return self.transform.transforms[0](image)  # the resize; a no-op when the transform meets it again

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        with self.torch.inference_mode():
            batch = self.torch.stack([self.transform(image) for image in images])
            return self.forward(batch).float().softmax(1).cpu().numpy()


def load_backend(model: str | Path, engine: str | None = None):
    """An ONNX file or a run directory (computed by the run's engine, or `engine`)."""
    path = Path(model)
    if path.suffix == ".onnx":
        return OnnxBackend(path)
    return TorchBackend(path, engine)


def top_k(probabilities: np.ndarray, class_names: list[str], k: int) -> list[list[tuple[str, float]]]:
    k = min(k, len(class_names))
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(class_names[c], float(row[c])) for c in indices] for row, indices in zip(probabilities, order)]


def expand_folders(images: list) -> list:
    """The images as given, each folder replaced by the image files under it (recursively, in a
    stable order; hidden files and files without an image extension are left out)."""
    from .data.images import is_image_file

    out = []
    for image in images:
        path = Path(image)
        if path.is_dir():
            out += sorted((str(f) for f in path.rglob("*") if is_image_file(f) and f.is_file()), key=str)
        else:
            out.append(image)
    return out


def predict_images(backend, images: list, k: int = 5, batch_size: int = 32) -> list:
    """(image, [(class, probability)], error) per image, in order (a folder: the images under it);
    unreadable files get an error. Images are decoded a batch at a time and shrunk to the model's
    input at once (bounded memory)."""
    images = expand_folders(images)
    results: list = [None] * len(images)
    for start in range(0, len(images), batch_size):
        decoded, positions = [], []
        for i in range(start, min(start + batch_size, len(images))):
            path = images[i]
            if not_a_file(path):
                results[i] = (str(path), [], not_a_file(path))
                continue
            try:
                decoded.append(backend.shrink(open_image(path)))
                positions.append(i)
            except ImageTooLarge as exc:
                results[i] = (str(path), [], f"image is {exc}")
            except Exception as exc:
                results[i] = (str(path), [], f"not a readable image ({exc.__class__.__name__})")
        if decoded:
            probabilities = backend.probabilities(decoded)
            finite = np.isfinite(probabilities).all(1)
            for i, ranked, ok in zip(positions, top_k(probabilities, backend.class_names, k), finite):
                results[i] = (str(images[i]), ranked, None) if ok else \
                    (str(images[i]), [], "the model's output is not finite: its weights are damaged")
    return results


def write_predictions(results: list, out: str | Path) -> Path:
    """(image, [(class, probability)], error) rows as a CSV (path, error, class_1, probability_1, ...)
    or JSON file, by `out`'s suffix; written whole or not at all."""
    import csv
    import io

    from .files import spreadsheet_safe_row, write_atomically

    out = Path(out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--out {out}: name a .csv or .json file")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name a .csv or .json file")
    if out.suffix.lower() == ".json":
        text = json.dumps([{"image": i, "error": e, "top": [{"class": c, "probability": round(p, 6)} for c, p in t]}
                           for i, t, e in results], indent=1)
    else:
        k = max((len(t) for _, t, _ in results), default=0)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "error", *[f"{what}_{n}" for n in range(1, k + 1) for what in ("class",
                                                                                              "probability")]])
        for image, top, error in results:
            writer.writerow(spreadsheet_safe_row([image, error or "", *[v for c, p in top for v in (c, f"{p:.6f}")]]))
        text = buffer.getvalue()
    try:
        write_atomically(out, text, "the predictions")
    except FileNotFoundError:
        raise UserError(f"--out {out}: its folder does not exist") from None
    return out


def predict_onnx(model: str | Path, images: list[str], k: int = 5, batch_size: int = 32) -> list:
    """Predictions from an exported ONNX file: onnxruntime, numpy and PIL, no torch."""
    return predict_images(OnnxBackend(model), images, k, batch_size)


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first
    error: str | None = None


def predict(run_dir: str | Path, images: list[str | Path], top_k: int = 5, batch_size: int = 32,
            engine: str | None = None) -> list[Prediction]:
    """Top-k classes with probabilities for each image; unreadable files get an error, not an exception.
    The run's network is computed by the run's engine, or `engine`."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k} is not valid: it must be >= 1")
    images = expand_folders(list(images))
    backend = TorchBackend(run_dir, engine, images=len(images))
    return [Prediction(*p) for p in predict_images(backend, images, top_k, batch_size)]
