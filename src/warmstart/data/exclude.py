"""`--exclude FILE`: photos left out of every split, listed by hand (one path per line; a WebDataset
sample by `SHARD#KEY` or its key alone) or by an
audit (label_issues.csv, outliers.csv: their `path` column; duplicates.csv: of each pair, the
train-side photo when a pair crosses splits, else its second photo; duplicate_groups.csv: every
member of a group but its first)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import UserError, excerpt
from ..files import from_spreadsheet_safe
from .imageset import ImageSet


def _key(path) -> str:
    return os.path.normcase(os.path.abspath(str(getattr(path, "path", path))))


def _keys(item) -> set[str]:
    """What a list may name an item by: its path (for a shard's sample `SHARD#KEY`), and a shard
    sample's bare key."""
    names = {_key(item)}
    if isinstance(getattr(item, "key", None), str):
        names.add(_key(item.key))
    return names


def listed(file: str | Path) -> set[str]:
    """The paths FILE names (normalised). An audit CSV is read as CSV (a quoted file name may hold
    a newline); a hand-written list one path a line."""
    path = Path(file)
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file") if path.exists() else "does not exist"
        raise UserError(f"--exclude {file} {what}: pass a list of photos (one path a line) or an audit CSV")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--exclude {file} is not readable UTF-8 text ({exc.__class__.__name__})") from None
    lines = text.splitlines()
    try:
        header = next(csv.reader(lines[:1]), [])
        if "path" in header or {"path_a", "path_b"} <= set(header):
            rows = [{k: from_spreadsheet_safe(v or "") for k, v in row.items() if k is not None}
                    for row in csv.DictReader(io.StringIO(text, newline=""))]
            if "group" in header:  # duplicate_groups.csv: every member but the first of its group
                firsts = {}
                for r in rows:
                    firsts.setdefault(r.get("group"), r.get("path"))
                return {_key(r["path"]) for r in rows if r.get("path") and r["path"] != firsts[r.get("group")]}
            if "path" in header:
                return {_key(r["path"]) for r in rows if r.get("path")}
            return {_key(r["path_a"] if r.get("split_a") == "train" and r.get("split_b") != "train" else r["path_b"])
                    for r in rows if r.get("path_a") and r.get("path_b")}
    except csv.Error as exc:
        raise UserError(f"--exclude {file} is not a readable CSV ({str(exc)[:80]}): pass an audit's CSV as written, "
                        f"or one path a line") from None
    return {_key(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")}


def exclude(splits: dict[str, ImageSet], file: str | Path, drop_empty_classes: bool = False
            ) -> tuple[dict[str, ImageSet], int]:
    """The splits without the photos FILE lists, and how many were left out; a listed path that is
    in no split is one line (a list written for other data). A class left with no training photo
    stops the run as an empty class folder does, unless `drop_empty_classes`: then it leaves every
    split (its name in train's extra["dropped_classes"])."""
    names = listed(file)
    seen, out = set(), {}
    for name, images in splits.items():
        keys = [_keys(item) for item in images.items]
        matched = [k & names for k in keys]
        seen.update(k for m in matched for k in m)
        out[name] = images.subset([i for i, m in enumerate(matched) if not m])
        out[name].extra = dict(images.extra)
    missing = sorted(names - seen)
    if missing:
        raise UserError(f"--exclude {file}: {len(missing)} listed photo(s) are not in the data, e.g. "
                        f"{excerpt(missing[0], 120)}: was it written for other data?")
    train = out["train"]
    empty = [c for c, count in enumerate(train.class_counts()) if count == 0 and splits["train"].class_counts()[c]]
    if empty and not drop_empty_classes:
        names = ", ".join(train.class_names[c] for c in empty[:5]) + (" …" if len(empty) > 5 else "")
        raise UserError(f"--exclude {file} leaves class(es) with no training photo: {names}: exclude fewer photos, or "
                        f"pass --drop-empty-classes to leave the class(es) out")
    return (_without_classes(out, empty) if empty else out), len(seen)


def _without_classes(splits: dict[str, ImageSet], dropped: list[int]) -> dict[str, ImageSet]:
    """Every split without the photos of `dropped` classes, the other classes renumbered."""
    kept = [c for c in range(len(splits["train"].class_ids)) if c not in dropped]
    number = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, images in splits.items():
        rows = [i for i, label in enumerate(images.labels) if label in number]
        out[name] = ImageSet([images.items[i] for i in rows], [number[images.labels[i]] for i in rows],
                             [images.class_ids[c] for c in kept], [images.class_names[c] for c in kept],
                             images.origin, dict(images.extra))
    out["train"].extra["dropped_classes"] = (list(splits["train"].extra.get("dropped_classes", []))
                                             + [splits["train"].class_names[c] for c in dropped])
    return out
