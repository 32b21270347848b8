"""CSV manifests (the original demo's `dataset_meta` format): a file of `image_path,label` rows, or
a folder holding `train.csv` and `val.csv`/`test.csv`."""

from __future__ import annotations

import csv
from pathlib import Path

from ...errors import UserError
from ..imageset import SPLIT_ALIASES, ImageSet, readable_class_names
from .options import SourceOptions


def detect(data: str) -> bool:
    root = Path(data).expanduser()
    return (root.is_file() and root.suffix.lower() == ".csv") or (root.is_dir() and "train" in _split_csvs(root))


def load(data: str, class_ids: list[str] | None, options: SourceOptions) -> dict[str, ImageSet]:
    root = Path(data).expanduser()
    if root.is_file():
        return {"all": read_csv_manifest(root, class_ids, options.allow_outside_paths)}
    csvs = _split_csvs(root)
    train = read_csv_manifest(csvs["train"], class_ids, options.allow_outside_paths)
    return {"train": train, **{n: read_csv_manifest(csvs[n], train.class_ids, options.allow_outside_paths)
                               for n in ("val", "test") if n in csvs}}


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
    nul = next((i + 1 for i, r in enumerate(rows) if "\0" in r[0] or "\0" in r[1]), None)
    if nul is not None:
        raise UserError(f"CSV manifest {path}: row {nul} holds a NUL byte, which no path or label may contain: "
                        f"fix that row")
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
    return ImageSet([str(p) for p in paths], labels, class_ids, readable_class_names(class_ids), str(path))


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


def _split_csvs(root: Path) -> dict[str, Path]:
    found = {}
    for child in root.glob("*.csv"):
        name = SPLIT_ALIASES.get(child.stem.lower())
        if name:
            found[name] = child
    return found
