"""Data sources: an image-folder tree, a CSV manifest, or the embedded digits, as labelled splits."""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import stanford_dogs
from .download import ensure_stanford_dogs
from .images import is_hidden_or_system, is_image_file
from .imageset import ImageSet, readable_class_name, stratified_split

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "eval": "val", "test": "test"}
BUILTIN_DIGITS = "sklearn-digits"
SYNTHETIC = "synthetic"


# -- folder trees ---------------------------------------------------------------------
def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_class_tree(root: Path, class_ids: list[str] | None = None, drop_empty: bool = False) -> ImageSet:
    folders = _class_folders(root)
    if not folders:
        raise UserError(f"{root} has no class folders: expected {root}/<class>/<image files>")
    found: dict[str, list[Path]] = {}
    ignored: list[tuple[str, str]] = []
    for folder in folders:
        images = []
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or is_hidden_or_system(path) or any(
                    part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            if is_image_file(path):
                images.append(path)
            else:
                ignored.append((str(path), f"not an image file ({path.suffix or 'no extension'})"))
        found[folder.name] = images
    if class_ids is None:
        class_ids = [f.name for f in folders]
        empty = [c for c in class_ids if not found[c]]
        if empty and drop_empty:
            class_ids = [c for c in class_ids if found[c]]
        elif empty:
            raise UserError(
                f"class folder(s) with no images in {root}: {', '.join(empty[:5])}"
                f"{' …' if len(empty) > 5 else ''}: add images, remove the folder(s), or pass --drop-empty-classes"
            )
    else:
        extra = sorted(c for c in set(found) - set(class_ids) if found[c] or not drop_empty)
        if extra:
            raise UserError(
                f"{root} has class folder(s) not in the training classes: {', '.join(extra[:5])}: "
                f"every split must use the same classes"
            )
    items, labels = [], []
    for label, class_id in enumerate(class_ids):
        for path in found.get(class_id, []):
            items.append(str(path))
            labels.append(label)
    dropped = [c for c in found if not found[c]] if drop_empty else []
    return ImageSet(items, labels, class_ids, [readable_class_name(c) for c in class_ids], str(root),
                    {"ignored": ignored, "dropped_classes": dropped})


# -- CSV manifests --------------------------------------------------------------------
def read_csv_manifest(path: Path, class_ids: list[str] | None = None, allow_outside: bool = False) -> ImageSet:
    """The original demo's `dataset_meta` format: `image_path,label` rows, paths relative to the CSV.

    Labels are class names, or integer indices when every label is a number (then the classes are
    the numbers present, in numeric order). A header row (`image`/`path`/`filename`, `label`/`class`)
    is recognised and skipped. Paths must stay inside the CSV's folder unless `allow_outside`: a
    manifest must not be a way to read arbitrary files.
    """
    rows = _read_csv_rows(path)
    if rows and rows[0][0].strip().lower() in ("image", "image_path", "path", "filename", "file", "img"):
        rows = rows[1:]
    if not rows:
        raise UserError(f"CSV manifest {path} has no rows: expected 'image_path,label' per line")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad:
        raise UserError(f"CSV manifest {path}: row {bad[0]} is not 'image_path,label'")
    base = path.parent.resolve()
    paths = [(base / r[0].strip()).resolve() for r in rows]
    if not allow_outside:
        outside = next((p for p in paths if not p.is_relative_to(base)), None)
        if outside is not None:
            raise UserError(f"CSV manifest {path} names {outside}, outside the manifest's folder {base}: move the "
                            f"images under it, or pass --allow-outside-paths if you trust this manifest")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"CSV manifest {path} lists {len(missing)} image(s) that do not exist, e.g. {missing[0]}: "
            f"paths must be relative to the CSV's folder"
        )
    raw = [r[1].strip() for r in rows]
    numeric = all(label.isdigit() for label in raw)
    if numeric:  # "05" and "5" are one class
        raw = [str(int(label)) for label in raw]
    if class_ids is None:
        class_ids = [str(i) for i in sorted({int(label) for label in raw})] if numeric else sorted(set(raw))
    index = {c: i for i, c in enumerate(class_ids)}
    unknown = sorted({label for label in raw if label not in index})
    if unknown:
        raise UserError(f"CSV manifest {path} has labels not among the classes: {', '.join(unknown[:5])}")
    labels = [index[label] for label in raw]
    return ImageSet([str(p) for p in paths], labels, class_ids, [readable_class_name(c) for c in class_ids], str(path))


def _read_csv_rows(path: Path) -> list[list[str]]:
    """The non-empty rows of a UTF-8 CSV (a byte-order mark is dropped); other encodings are one line."""
    if not path.is_file():
        raise UserError(f"CSV manifest {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as exc:
        raise UserError(f"CSV manifest {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start}): save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as exc:
        raise UserError(f"CSV manifest {path} is not a readable CSV file ({exc})") from None


# -- embedded data --------------------------------------------------------------------
def load_digits_images() -> ImageSet:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as uint8 RGB arrays."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    items = [np.repeat(g[:, :, None], 3, axis=2) for g in gray]
    class_ids = [str(i) for i in range(10)]
    return ImageSet(items, digits.target.tolist(), class_ids, class_ids, BUILTIN_DIGITS)


def synthetic_images(count: int = 640, num_classes: int = 10, size: int = 256, seed: int = 0) -> ImageSet:
    """Random images (the original demo's synthetic inputter): measures the model, not the disk."""
    rng = np.random.default_rng(seed)
    items = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    labels = [i % num_classes for i in range(count)]
    class_ids = [f"class_{i}" for i in range(num_classes)]
    return ImageSet(items, labels, class_ids, class_ids, SYNTHETIC)


# -- resolving --data into splits -------------------------------------------------------
def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for child in root.iterdir():
        name = _SPLIT_ALIASES.get(child.name.lower())
        if name and child.is_dir():
            found[name] = child
    return found


def _split_csvs(root: Path) -> dict[str, Path]:
    found = {}
    for child in root.glob("*.csv"):
        name = _SPLIT_ALIASES.get(child.stem.lower())
        if name:
            found[name] = child
    return found


@dataclass(frozen=True)
class SourceOptions:
    """How a data source is read (the run settings of the same names)."""

    crop_to_box: bool = False  # Stanford Dogs: the annotated dog box
    drop_empty_classes: bool = False  # leave out class folders without images
    allow_outside_paths: bool = False  # CSV manifests: paths outside the manifest's folder
    quiet: bool = False  # no download progress

    @classmethod
    def of(cls, config) -> "SourceOptions":
        return cls(config.crop_to_box, config.drop_empty_classes, config.allow_outside_paths, config.quiet)


def load_source(data: str, class_ids: list[str] | None = None,
                options: SourceOptions = SourceOptions()) -> dict[str, ImageSet]:
    """The splits a data source provides on its own (before any validation carve-out)."""
    crop_to_box, drop_empty_classes = options.crop_to_box, options.drop_empty_classes
    allow_outside_paths = options.allow_outside_paths
    if data == BUILTIN_DIGITS:
        return {"all": load_digits_images()}
    if data == SYNTHETIC or data.startswith(SYNTHETIC + ":"):
        count = data.partition(":")[2]
        if count and not count.isdigit():
            raise UserError(f"--data {data}: use 'synthetic' or 'synthetic:N' with N images")
        return {"all": synthetic_images(int(count) if count else 640)}
    if not data:
        raise UserError("no training data: pass --data ROOT (an image-folder tree or a CSV manifest)")
    if data == stanford_dogs.NAME:
        return stanford_dogs.load_stanford_dogs(ensure_stanford_dogs(options.quiet), crop_to_box, class_ids)
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"data path {root} does not exist: pass --data ROOT with your images")
    if root.is_dir() and stanford_dogs.is_stanford_dogs(root):
        return stanford_dogs.load_stanford_dogs(root, crop_to_box, class_ids)
    if crop_to_box:
        raise UserError(f"--crop-to-box needs bounding-box annotations (the Stanford Dogs layout); {root} has none")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UserError(f"--data {root} is a file but not a .csv manifest")
        return {"all": read_csv_manifest(root, class_ids, allow_outside_paths)}
    if not any(True for _ in root.iterdir()):
        raise UserError(f"data folder {root} is empty: expected {root}/train/<class>/* or {root}/<class>/*")
    splits = _split_folders(root)
    csvs = _split_csvs(root)
    if "train" in splits:
        train = _scan_class_tree(splits["train"], class_ids, drop_empty_classes)
        # val/test use the training classes, in the same order
        return {"train": train, **{n: _scan_class_tree(splits[n], train.class_ids) for n in ("val", "test")
                                   if n in splits}}
    if "train" in csvs:
        train = read_csv_manifest(csvs["train"], class_ids, allow_outside_paths)
        return {"train": train, **{n: read_csv_manifest(csvs[n], train.class_ids, allow_outside_paths)
                                   for n in ("val", "test") if n in csvs}}
    if set(splits) - {"train"}:
        raise UserError(f"{root} has {'/'.join(sorted(splits))} folder(s) but no train/: add {root}/train/<class>/*")
    return {"all": _scan_class_tree(root, class_ids, drop_empty_classes)}


def resolve_splits(data: str, val_fraction: float, seed: int, val_data: str | None = None,
                   class_ids: list[str] | None = None, options: SourceOptions = SourceOptions()) -> dict[str, ImageSet]:
    """train / val (/ test) splits. Validation comes from val/, --val-data, or a seeded
    stratified carve-out of the training images (its `extra["carved"]` says the fraction; 0 for
    none), never from test."""
    splits = load_source(data, class_ids, options)
    if "all" in splits:
        splits["train"] = splits.pop("all")
    train = splits["train"]
    if val_data:
        extra = load_source(val_data, train.class_ids, replace(options, drop_empty_classes=False))
        splits["val"] = extra.get("val") or extra.get("all") or extra.get("test") or extra["train"]
    elif "val" not in splits:
        keep, held = stratified_split(train.labels, val_fraction, seed)
        splits["train"], splits["val"] = train.subset(keep), train.subset(held)
        splits["val"].extra.update(ignored=[], carved=val_fraction)  # skipped files are reported with train
    if len(splits["train"]) == 0:
        raise UserError(f"no training images found in {data}")
    return splits


def describe_splits(splits: dict[str, ImageSet]) -> str:
    """`1,440 train / 360 val (20% of train, seeded) / 960 test images, 120 classes`."""
    train, val = splits["train"], splits["val"]
    carved = val.extra.get("carved")
    if carved == 0:
        val_part = "no validation (--val-fraction 0: the last epoch is kept)"
    elif carved is not None:
        val_part = f"{len(val):,} val ({carved:.0%} of train, seeded)"
    else:
        val_part = f"{len(val):,} val"
    parts = [f"{len(train):,} train", val_part] + ([f"{len(splits['test']):,} test"] if "test" in splits else [])
    return f"{' / '.join(parts)} images, {len(train.class_ids)} classes"
