"""WebDataset shards: uncompressed tar files whose consecutive members with one key form a sample
(`n02085620_7.jpg` + `n02085620_7.cls`), read and written with the standard library's tarfile.

Reading is one sequential pass over each shard's headers (an index: per sample its key, where its
image lies, and its label, read from the tiny label member), then each image is one positioned
read of its member, whether the shard is a local file or an fsspec URL. The webdataset library's
streaming pipeline was not used: a positioned read gives the rest of warmstart what it keys on (a
sample the feature cache, `--exclude`, the audit, the report and resume can name and read again),
and `python -m benchmarks.run --only shards` measures it against the folder it was packed from.

The pass reads no member whole but the labels (≤ 64 KiB): an image member over MAX_MEMBER_BYTES
is skipped from its header, a truncated shard keeps the samples it holds whole, a shard that is
not an uncompressed tar, a sample without a label or with a label outside the classes, and a
member that is neither image nor label each become one entry of the split's skipped files.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .images import IMAGE_EXTENSIONS
from .imageset import SPLIT_ALIASES

LABEL_EXTENSIONS = ("cls", "json")
MAX_LABEL_BYTES = 64 << 10
# the largest photo file read whole: a JPEG at the decoder's 89-Mpixel limit is ~30 MB at quality 95
MAX_MEMBER_BYTES = 64 << 20
READ_AHEAD = 8 << 20  # bytes fetched at once from a shard at a URL
SPEC_FILE = "dataset.yaml"
_BRACE = re.compile(r"\{([^{}]*)\}")
_SPLIT_PREFIX = re.compile(r"^(train|val|valid|validation|eval|test)[-_.]", re.IGNORECASE)
WDS_EXTRA = "pip install 'warmstart[wds]'"


@dataclass(frozen=True)
class ShardMember:
    """One sample's image: `size` bytes at `offset` in the shard at `shard` (a path or URL)."""

    shard: str
    offset: int
    size: int
    key: str

    def __str__(self) -> str:
        return f"{self.shard}#{self.key}"

    def read_bytes(self) -> bytes:
        with _open_handle(self.shard) as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise OSError(f"the shard ends {self.size - len(data)} bytes into this member (truncated)")
        return data

    def stat_key(self, stat) -> str:
        return f"{self}|{self.offset}|{self.size}|{stat(self.shard) if is_local(self.shard) else ''}"


def is_url(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def is_local(name: str) -> bool:
    return not is_url(name)


def local_path(name: str) -> Path:
    return Path(name[len("file://"):] if name.startswith("file://") else name).expanduser()


def open_shard(name: str):
    """A binary file object for a shard: local files directly, URLs through fsspec."""
    if is_local(name):
        return open(local_path(name), "rb")
    return _open_url(name)


def _open_url(name: str, block_size: int | None = None):
    try:
        import fsspec
    except ImportError:
        raise UserError(f"reading {name} needs fsspec: {WDS_EXTRA}") from None
    try:
        options = {"block_size": block_size, "cache_type": "readahead"} if block_size else {}
        try:
            return fsspec.open(name, "rb", **options).open()
        except TypeError:  # a filesystem whose files take no read-ahead options (in memory, local)
            return fsspec.open(name, "rb").open()
    except (ImportError, ValueError) as exc:  # no backend for the protocol (s3fs, gcsfs, …)
        raise UserError(f"cannot open {name}: {str(exc).splitlines()[0][:160]}") from None


_HANDLES: "OrderedDict[tuple[int, str], tuple[threading.Lock, object]]" = OrderedDict()
_HANDLES_LOCK = threading.Lock()
OPEN_HANDLES = 8  # shards kept open per process: the streamed order reads from one or two at a time


@contextmanager
def _open_handle(name: str):
    """A shard's file kept open in this process (the least recently used closed past OPEN_HANDLES),
    so that reads that follow each other in a shard (the streamed order) reuse one handle, and at
    a URL, fsspec's read-ahead blocks: a shard is fetched in large blocks, not a request a photo."""
    key = (os.getpid(), name)  # a forked loader worker opens its own
    with _HANDLES_LOCK:
        entry = _HANDLES.pop(key, None)
        if entry is None:
            handle = open_shard(name) if is_local(name) else _open_url(name, READ_AHEAD)
            entry = (threading.Lock(), handle)
        _HANDLES[key] = entry
        while len(_HANDLES) > OPEN_HANDLES:
            (_, stale) = _HANDLES.popitem(last=False)[1]
            stale.close()
    with entry[0]:
        yield entry[1]


def expand(pattern: str) -> list[str]:
    """Brace expansion as WebDataset writes shard sets: `a-{000..012}.tar` (a zero-padded range),
    `{train,val}-0.tar` (alternatives), several braces multiply."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        low, high = int(ranged.group(1)), int(ranged.group(2))
        if high < low or high - low > 1_000_000:
            raise UserError(f"shard pattern {pattern}: the range {{{body}}} must run upwards, at most 1,000,000 shards")
        width = len(ranged.group(1))
        choices = [f"{n:0{width}d}" for n in range(low, high + 1)]
    else:
        choices = body.split(",")
    return [head + choice + rest for choice in choices for rest in expand(tail)]


def looks_like_shards(data: str) -> bool:
    """A shard pattern, a .tar, a list of shards, a dataset.yaml, or a folder holding .tar files."""
    if data.endswith(".tar") or (_BRACE.search(data) and ".tar" in data):
        return True
    if is_url(data):
        return False
    path = local_path(data)
    if path.is_file():
        return path.name == SPEC_FILE or (path.suffix in (".txt", ".shards") and _listed(path) is not None)
    return path.is_dir() and ((path / SPEC_FILE).is_file() or any(path.glob("*.tar")))


def _listed(path: Path) -> list[str] | None:
    """The shards a list file names (one a line, relative to the file), or None if it is not one."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()[:100_000]]
    except (OSError, UnicodeDecodeError):
        return None
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines or not all(line.endswith(".tar") for line in lines):
        return None
    return [line if is_url(line) or os.path.isabs(line) else str(path.parent / line) for line in lines]


def split_sets(data: str) -> tuple[dict[str, list[str]], list[str] | None, str]:
    """({split or "all": shards}, class ids from dataset.yaml or None, where they were named)."""
    path = None if is_url(data) else local_path(data)
    if path is not None and path.is_dir() and (path / SPEC_FILE).is_file():
        path = path / SPEC_FILE
    if path is not None and path.is_file() and path.name == SPEC_FILE:
        return _from_spec(path)
    if path is not None and path.is_file() and path.suffix in (".txt", ".shards"):
        return {"all": _listed(path) or []}, _spec_classes(path.parent), str(path)
    if path is not None and path.is_dir():
        shards, folder = sorted(str(p) for p in path.glob("*.tar")), path
    else:
        shards = expand(data)
        folder = None if is_url(data) else local_path(shards[0]).parent
        first = Path(shards[0]).name
        match = _SPLIT_PREFIX.match(first)
        if match is not None and folder is not None:  # train-*.tar: its val-*/test-* siblings too
            own = SPLIT_ALIASES[match.group(1).lower()]
            named = {own: shards}
            for other in sorted(folder.glob("*.tar")):
                found = _SPLIT_PREFIX.match(other.name)
                split = SPLIT_ALIASES[found.group(1).lower()] if found else own
                if split != own:
                    named.setdefault(split, []).append(str(other))
            return named, _spec_classes(folder), data
        return {"all": shards}, _spec_classes(folder) if folder else None, data
    grouped: dict[str, list[str]] = {}
    for shard in shards:
        match = _SPLIT_PREFIX.match(Path(shard).name)
        grouped.setdefault(SPLIT_ALIASES[match.group(1).lower()] if match else "all", []).append(shard)
    if "all" in grouped and len(grouped) > 1:
        grouped["train"] = grouped.get("train", []) + grouped.pop("all")
    return grouped, _spec_classes(folder), str(folder)


def _spec_classes(folder: Path | None) -> list[str] | None:
    spec = folder / SPEC_FILE if folder is not None else None
    return _from_spec(spec)[1] if spec is not None and spec.is_file() else None


def _from_spec(spec: Path) -> tuple[dict[str, list[str]], list[str] | None, str]:
    """dataset.yaml: `train:`, `val:`, `test:` (a pattern or a list of shards, relative to the
    file) and `classes:` (the class ids in label order)."""
    import yaml

    try:
        content = yaml.safe_load(spec.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{spec} is not readable YAML ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(content, dict):
        raise UserError(f"{spec} must be a mapping of train/val/test shard patterns and classes")
    splits: dict[str, list[str]] = {}
    for name, value in content.items():
        split = SPLIT_ALIASES.get(str(name).lower())
        if split is None:
            continue
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise UserError(f"{spec}: '{name}' must be a shard pattern or a list of shards")
        splits[split] = [s if is_url(s) or os.path.isabs(s) else str(spec.parent / s)
                         for p in patterns for s in expand(p)]
    classes = content.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes
                                or len({str(c) for c in classes}) != len(classes)):
        raise UserError(f"{spec}: 'classes' must be a list of distinct class names in label order")
    if "train" not in splits:
        raise UserError(f"{spec} names no train shards: add 'train: train-{{000000..000009}}.tar'")
    return splits, [str(c) for c in classes] if classes else None, str(spec)


# --- the index: one pass over each shard's headers --------------------------------------------

@dataclass
class ShardIndex:
    """The samples of a set of shards: each image member, its raw label, and what was skipped."""

    members: list[ShardMember]
    labels: list  # int (a .cls or a json number) or str (a json class name)
    skipped: list[tuple[str, str]]


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member's path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def _raw_label(extension: str, data: bytes):
    text = data.decode("utf-8").strip()
    if extension == "cls":
        return int(text)
    value = json.loads(text)
    if isinstance(value, dict):
        value = next((value[k] for k in ("label", "cls", "class") if k in value), None)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("no 'label', 'cls' or 'class' (an integer or a class name)")
    return value


def index_shards(shards: list[str]) -> ShardIndex:
    index = ShardIndex([], [], [])
    for shard in shards:
        _index_shard(shard, index)
    return index


def _index_shard(shard: str, index: ShardIndex) -> None:
    local = is_local(shard)
    try:
        handle = open_shard(shard)
    except OSError as exc:
        index.skipped.append((shard, f"shard cannot be read ({exc.__class__.__name__}: {exc.strerror or exc})"))
        return
    with handle:
        end = os.fstat(handle.fileno()).st_size if local else None
        try:
            archive = tarfile.open(fileobj=handle, mode="r:" if local else "r|")
        except tarfile.ReadError:
            index.skipped.append((shard, "not an uncompressed tar archive (a WebDataset shard): left out"))
            return
        sample: dict = {}
        try:
            for member in archive:
                key, extension = _split_name(member.name)
                if sample and key != sample["key"]:
                    _close(sample, shard, index)
                    sample = {}
                sample.setdefault("key", key)
                if not member.isfile():
                    continue
                if end is not None and member.offset_data + member.size > end:
                    index.skipped.append((f"{shard}#{key}", "the shard is truncated inside this sample: left out"))
                    sample = {}
                    break
                if "." + extension in IMAGE_EXTENSIONS:
                    if member.size > MAX_MEMBER_BYTES:
                        sample["problem"] = f"image member of {member.size:,} bytes is over the {MAX_MEMBER_BYTES:,}-byte limit"
                    elif "image" not in sample:
                        sample["image"] = ShardMember(shard, member.offset_data, member.size, key)
                elif extension in LABEL_EXTENSIONS and "label" not in sample:
                    if member.size > MAX_LABEL_BYTES:
                        sample["problem"] = f"label member of {member.size:,} bytes is over the {MAX_LABEL_BYTES:,}-byte limit"
                        continue
                    try:
                        sample["label"] = _raw_label(extension, archive.extractfile(member).read())
                    except (ValueError, UnicodeDecodeError) as exc:
                        sample["problem"] = f"unreadable .{extension} label ({str(exc)[:60]})"
                else:
                    index.skipped.append((f"{shard}#{member.name}", f"neither an image nor a label "
                                          f"(.{extension or 'no extension'}): ignored"))
        except (tarfile.ReadError, EOFError, OSError) as exc:
            if sample.get("image") is not None and not local:
                sample.pop("image")  # its data may not have arrived whole
            index.skipped.append((shard, f"the shard ends early ({str(exc)[:60]}): the samples before kept"))
        if sample:
            _close(sample, shard, index)


def _close(sample: dict, shard: str, index: ShardIndex) -> None:
    where = f"{shard}#{sample['key']}"
    if "problem" in sample:
        index.skipped.append((where, sample["problem"] + ": left out"))
    elif "image" not in sample:
        index.skipped.append((where, "a sample with no image member: left out"))
    elif "label" not in sample:
        index.skipped.append((where, "a sample with no label (.cls or .json): left out"))
    else:
        index.members.append(sample["image"])
        index.labels.append(sample["label"])


# --- writing shards -------------------------------------------------------------------------

def pack(splits: dict, out: str | Path, shard_size: int = 1000, say=print) -> Path:
    """Every split of `splits` ({name: ImageSet}) as WebDataset shards in OUT (`train-000000.tar`,
    …: each sample its image file's bytes as stored and a `.cls`), and OUT/dataset.yaml naming the
    shard sets and the classes. Returns the yaml's path."""
    import yaml

    from .images import open_image, whole_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise UserError(f"{out} already holds .tar shards: pack into an empty folder")
    spec: dict = {}
    for name, images in splits.items():
        keys: set[str] = set()
        count = max(1, -(-len(images) // shard_size))
        spec[name] = f"{name}-{{{0:06d}..{count - 1:06d}}}.tar"
        for number in range(count):
            rows = range(number * shard_size, min(len(images), (number + 1) * shard_size))
            with tarfile.open(out / f"{name}-{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
                for row in rows:
                    item, key = images.items[row], _key_for(images.items[row], row, keys)
                    path = whole_file(item)
                    if path is not None:
                        data, extension = Path(path).read_bytes(), Path(path).suffix.lower().lstrip(".") or "jpg"
                    else:  # arrays, boxes, other shards: their pixels as PNG
                        buffer = io.BytesIO()
                        open_image(item).save(buffer, format="PNG")
                        data, extension = buffer.getvalue(), "png"
                    if extension == "jpeg":
                        extension = "jpg"
                    _add(archive, f"{key}.{extension}", data)
                    _add(archive, f"{key}.cls", str(images.labels[row]).encode())
        say(f"{name}: {len(images):,} samples in {count} shard(s)")
    spec["classes"] = list(next(iter(splits.values())).class_ids)
    path = out / SPEC_FILE
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _key_for(item, row: int, taken: set[str]) -> str:
    """A sample's key: its file's name without extension (dots would end a WebDataset key), or the
    row number for pixels without a file; made unique within the split."""
    stem = Path(str(getattr(item, "path", item))).stem if not hasattr(item, "shape") else ""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(getattr(item, "key", stem)).replace(".", "_")) or f"{row:08d}"
    if key in taken:
        key = f"{key}_{row:08d}"
    taken.add(key)
    return key


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    archive.addfile(info, io.BytesIO(data))


def stream_ids(items) -> list[int] | None:
    """Each item's shard as a number, for a streamed order (None when the items are not shards')."""
    if not items or not all(isinstance(item, ShardMember) for item in items):
        return None
    numbers: dict[str, int] = {}
    return [numbers.setdefault(item.shard, len(numbers)) for item in items]
