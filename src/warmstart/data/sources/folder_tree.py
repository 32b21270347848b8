"""Image-folder trees: `ROOT/train/<class>/*` with `val/` and/or `test/`, or one `ROOT/<class>/*`."""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from ..images import is_hidden_or_system, is_image_file
from ..imageset import SPLIT_ALIASES, ImageSet, readable_class_names
from .options import SourceOptions


def detect(data: str) -> bool:
    return Path(data).expanduser().is_dir()


def load(data: str, class_ids: list[str] | None, options: SourceOptions) -> dict[str, ImageSet]:
    root = Path(data).expanduser()
    if not any(True for _ in root.iterdir()):
        raise UserError(f"data folder {root} is empty: expected {root}/train/<class>/* or {root}/<class>/*")
    splits = _split_folders(root)
    if "train" in splits:
        train = _scan_class_tree(splits["train"], class_ids, options.drop_empty_classes)
        # val/test use the training classes, in the same order
        # (a class dropped from train for want of images: its empty val/test folders go too)
        return {"train": train, **{n: _scan_class_tree(splits[n], train.class_ids, options.drop_empty_classes)
                                   for n in ("val", "test") if n in splits}}
    if set(splits) - {"train"}:
        raise UserError(f"{root} has {'/'.join(sorted(splits))} folder(s) but no train/: add {root}/train/<class>/*")
    return {"all": _scan_class_tree(root, class_ids, options.drop_empty_classes)}


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
    return ImageSet(items, labels, class_ids, readable_class_names(class_ids), str(root),
                    {"ignored": ignored, "dropped_classes": dropped})


def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for child in root.iterdir():
        name = SPLIT_ALIASES.get(child.name.lower())
        if name and child.is_dir():
            found[name] = child
    return found
