"""Hugging Face datasets: `--data hf:PATH` for a dataset saved with `save_to_disk`, a folder of
parquet files (`train-*.parquet`, `validation-*.parquet`, … as the Hub lays them out), or an
`imagefolder`, read through the `datasets` library (`pip install 'warmstart[hf]'`).

The image column is the one of the `Image` feature (else `--image-column`), the label column the
one of the `ClassLabel` feature, whose names become the classes (else `--label-column`, or a column
named label/labels/class/target). Each photo is one row, read when it is needed from the
memory-mapped Arrow files: its encoded bytes as stored, decoded by warmstart's own guarded decoder
(never by the library's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ...errors import UserError
from ..imageset import SPLIT_ALIASES, ImageSet, classes_present, labelled
from ..shards import MAX_MEMBER_BYTES
from .options import SourceOptions

PREFIX = "hf:"
HF_EXTRA = "pip install 'warmstart[hf]'"
LABEL_NAMES = ("label", "labels", "class", "target", "cls", "fine_label")
IMAGE_NAMES = ("image", "img", "jpg", "png", "picture", "photo")


def detect(data: str) -> bool:
    return data.startswith(PREFIX)


@dataclass(frozen=True)
class ArrowTable:
    """One split's Arrow files and its image column: what a row needs to be read again anywhere."""

    files: tuple[str, ...]
    column: str
    origin: str


@dataclass(frozen=True)
class DatasetRow:
    """One photo of a Hugging Face dataset: row `index` of `table`."""

    table: ArrowTable
    index: int

    def __str__(self) -> str:
        return f"{self.table.origin}#{self.index}"

    def read_bytes(self) -> bytes:
        value = _opened(self.table)[self.index][self.table.column]
        if not isinstance(value, dict):
            raise ValueError(f"the row's {self.table.column!r} holds no image")
        if value.get("bytes") is not None:
            return value["bytes"]
        path = value.get("path")
        if not path:
            raise ValueError(f"the row's {self.table.column!r} holds neither bytes nor a path")
        if os.path.getsize(path) > MAX_MEMBER_BYTES:
            raise ValueError(f"{path} is over the {MAX_MEMBER_BYTES:,}-byte limit")
        return Path(path).read_bytes()

    def stat_key(self, stat) -> str:
        return f"{self}|{stat(self.table.files[0])}|{len(self.table.files)}"


@lru_cache(maxsize=8)
def _opened(table: ArrowTable):
    """The split's rows, memory-mapped, with only the image column, its bytes left undecoded."""
    import datasets

    parts = [datasets.Dataset.from_file(f) for f in table.files]
    data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return data.select_columns([table.column]).cast_column(table.column, datasets.Image(decode=False))


def _library():
    try:
        import datasets
    except ImportError:
        raise UserError(f"--data hf:… reads Hugging Face datasets through the 'datasets' library: {HF_EXTRA}") from None
    datasets.disable_progress_bars()
    return datasets


def _open(path: Path):
    """{split name as the dataset names it: Dataset}."""
    datasets = _library()
    if not path.exists():
        raise UserError(f"--data hf:{path}: no such folder (a save_to_disk folder, parquet files or an imagefolder)")
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix == ".parquet" or any(path.rglob("*.parquet")):
            loaded = datasets.load_dataset("parquet", data_files=str(path) if path.is_file() else None,
                                           data_dir=None if path.is_file() else str(path))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    except (ValueError, FileNotFoundError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
        raise UserError(f"--data hf:{path} is not a dataset the 'datasets' library reads "
                        f"({str(exc).splitlines()[0][:160]})") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"all": loaded}


def _column(data, wanted: str | None, feature: str, names: tuple[str, ...], what: str, flag: str, origin: str) -> str:
    columns = list(data.features)
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{flag} {wanted}: {origin} has no such column (it has {', '.join(columns)})")
        return wanted
    typed = [c for c in columns if type(data.features[c]).__name__ == feature]
    named = [c for c in columns if c.lower() in names]
    found = (typed or named)[:1]
    if not found:
        raise UserError(f"{origin}: which column holds the {what}? none is an {feature} feature or named "
                        f"{'/'.join(names[:4])}: pass {flag} NAME (columns: {', '.join(columns)})")
    return found[0]


def load(data: str, class_ids: list[str] | None, options: SourceOptions) -> dict[str, ImageSet]:
    path = Path(data[len(PREFIX):]).expanduser()
    splits = _open(path)
    first = next((n for n in splits if SPLIT_ALIASES.get(n.lower()) == "train"), None) or next(iter(splits))
    image_column = _column(splits[first], options.image_column, "Image", IMAGE_NAMES, "images", "--image-column", data)
    label_column = _column(splits[first], options.label_column, "ClassLabel", LABEL_NAMES, "labels",
                           "--label-column", data)
    feature = splits[first].features[label_column]
    named = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
    raw = {name: list(split[label_column]) for name, split in splits.items()}
    if class_ids is None:
        class_ids = named or classes_present([v for v in raw[first] if v is not None])
        if not class_ids:
            raise UserError(f"{data}: the label column holds neither class numbers nor class names "
                            f"(pass --label-column NAME, or save the labels as a ClassLabel feature)")
    by_index = named is not None
    out = {}
    for name, split in splits.items():
        if name != first and SPLIT_ALIASES.get(name.lower()) is None:
            continue  # e.g. "unsupervised": not a labelled split warmstart uses
        files = tuple(f["filename"] for f in split.cache_files)
        if not files:
            raise UserError(f"{data}: split {name} is held in memory only; save it with save_to_disk first")
        table = ArrowTable(files, image_column, f"{data}[{name}]")
        key = "all" if name == "all" else SPLIT_ALIASES.get(name.lower(), name)
        rows = [DatasetRow(table, index) for index in range(len(raw[name]))]
        out["train" if name == first and len(splits) > 1 else key] = labelled(rows, raw[name], class_ids, by_index,
                                                                              table.origin, [])
    return out
