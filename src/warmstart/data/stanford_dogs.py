"""Stanford Dogs in its own layout, on the official split (12,000 train / 8,580 test).

Layout: `Images/<wnid>-<breed>/*.jpg`, `Annotation/<wnid>-<breed>/<image id>` (Pascal-VOC XML
with the dog boxes) and the `train_list.mat` / `test_list.mat` files of `lists.tar`, at the
root or under `lists/`.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import UserError
from .images import BoxedImage
from .imageset import ImageSet, readable_class_names

NAME = "stanford-dogs"
BASE_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
ARCHIVES = ("lists.tar", "images.tar", "annotation.tar")
OFFICIAL_COUNTS = {"train": 12_000, "test": 8_580, "classes": 120}


def default_dir() -> Path:
    """Where `--data stanford-dogs` lives: $WARMSTART_DATA/stanford-dogs or ~/.cache/warmstart/stanford-dogs."""
    base = os.environ.get("WARMSTART_DATA") or Path.home() / ".cache" / "warmstart"
    return Path(base) / NAME


def find_list(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / "lists" / name):
        if candidate.is_file():
            return candidate
    return None


def is_stanford_dogs(root: Path) -> bool:
    return (root / "Images").is_dir() and find_list(root, "train_list.mat") is not None


def _strings(cell) -> list[str]:
    """A MATLAB cell array of strings, as scipy.io.loadmat returns it, to a list of str."""
    return [str(np.asarray(entry).ravel()[0]) for entry in np.asarray(cell).ravel()]


def read_list(path: Path) -> tuple[list[str], list[str], list[int]]:
    """(image paths relative to Images/, annotation paths relative to Annotation/, 1-based labels)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
        files = _strings(mat["file_list"])
        labels = [int(v) for v in np.asarray(mat["labels"]).ravel()]
        annotations = _strings(mat["annotation_list"]) if "annotation_list" in mat else \
            [f.rsplit(".", 1)[0] for f in files]
    except Exception as exc:
        raise UserError(f"{path} is not a Stanford Dogs split list ({exc.__class__.__name__}): "
                        f"re-extract lists.tar") from None
    if len(files) != len(labels) or len(files) != len(annotations):
        raise UserError(f"{path}: file_list, annotation_list and labels differ in length")
    return files, annotations, labels


def largest_box(xml_path: Path) -> tuple[int, int, int, int] | None:
    """The largest annotated bounding box (there may be several dogs), or None."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError):
        return None
    boxes = []
    for box in root.iter("bndbox"):
        try:
            coords = tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            continue
        if coords[2] > coords[0] and coords[3] > coords[1]:
            boxes.append(coords)
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) if boxes else None


def load_stanford_dogs(root: Path, crop_to_box: bool = False, class_ids: list[str] | None = None
                       ) -> dict[str, ImageSet]:
    """The official train and test splits."""
    train_list, test_list = find_list(root, "train_list.mat"), find_list(root, "test_list.mat")
    if train_list is None or test_list is None:
        raise UserError(f"{root} lacks train_list.mat/test_list.mat (at the root or in lists/): extract lists.tar there")
    lists = {"train": read_list(train_list), "test": read_list(test_list)}
    folders = sorted({f.split("/")[0] for files, _, _ in lists.values() for f in files})
    class_ids = class_ids or folders
    index = {c: i for i, c in enumerate(class_ids)}
    splits = {}
    for name, (files, annotation_paths, labels) in lists.items():
        items, targets, missing, boxes_missing = [], [], [], 0
        for file, annotation, label in zip(files, annotation_paths, labels):
            folder = file.split("/")[0]
            if folder not in index:
                raise UserError(f"{root}: {file} belongs to no known breed folder")
            if index[folder] != label - 1 and class_ids is folders:
                raise UserError(f"{root}: label {label} of {file} does not match its folder {folder}")
            path = root / "Images" / file
            if not path.is_file():
                missing.append(file)
                continue
            item: object = str(path)
            if crop_to_box:
                box = largest_box(root / "Annotation" / annotation)
                if box is None:
                    boxes_missing += 1
                else:
                    item = BoxedImage(str(path), box)
            items.append(item)
            targets.append(index[folder])
        if missing:
            raise UserError(f"{root}: {len(missing)} image(s) of {name}_list.mat are missing, e.g. Images/{missing[0]}: "
                            f"re-extract images.tar (warmstart data download stanford-dogs)")
        extra = {"boxes_missing": boxes_missing} if crop_to_box else {}
        splits[name] = ImageSet(items, targets, class_ids, readable_class_names(class_ids),
                                str(root), extra)
    return splits
