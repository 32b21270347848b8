"""`--exclude FILE`: photos left out of every split, listed by hand (one path per line) or by an
audit (label_issues.csv, outliers.csv: their `path` column; duplicates.csv: of each pair, the
train-side photo when a pair crosses splits, else its second photo)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import UserError, excerpt
from .imageset import ImageSet


def _key(path) -> str:
    return os.path.normcase(os.path.abspath(str(getattr(path, "path", path))))


def listed(file: str | Path) -> set[str]:
    """The paths FILE names (normalised)."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"--exclude {file} does not exist: pass a list of photos (one path a line) or an audit CSV")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--exclude {file} is not readable UTF-8 text ({exc.__class__.__name__})") from None
    header = next(csv.reader(lines[:1]), [])
    if "path" in header or {"path_a", "path_b"} <= set(header):
        rows = list(csv.DictReader(lines))
        if "path" in header:
            return {_key(r["path"]) for r in rows if r.get("path")}
        return {_key(r["path_a"] if r.get("split_a") == "train" and r.get("split_b") != "train" else r["path_b"])
                for r in rows if r.get("path_a") and r.get("path_b")}
    return {_key(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")}


def exclude(splits: dict[str, ImageSet], file: str | Path) -> tuple[dict[str, ImageSet], int]:
    """The splits without the photos FILE lists, and how many were left out; a listed path that is
    in no split is one line (a list written for other data)."""
    names = listed(file)
    seen, out = set(), {}
    for name, images in splits.items():
        keys = [_key(item) for item in images.items]
        seen.update(k for k in keys if k in names)
        out[name] = images.subset([i for i, k in enumerate(keys) if k not in names])
        out[name].extra = dict(images.extra)
    missing = sorted(names - seen)
    if missing:
        raise UserError(f"--exclude {file}: {len(missing)} listed photo(s) are not in the data, e.g. "
                        f"{excerpt(missing[0], 120)}: was it written for other data?")
    return out, len(seen)
