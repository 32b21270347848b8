"""Stanford Dogs on its official split: `--data stanford-dogs` (downloaded on first use) or a folder
in the dataset's own layout. The only source with dog boxes (`--crop-to-box`)."""

from __future__ import annotations

from pathlib import Path

from .. import stanford_dogs
from ..download import ensure_stanford_dogs
from ..imageset import ImageSet
from .options import SourceOptions

HAS_BOXES = True


def detect(data: str) -> bool:
    root = Path(data).expanduser()
    return data == stanford_dogs.NAME or (root.is_dir() and stanford_dogs.is_stanford_dogs(root))


def load(data: str, class_ids: list[str] | None, options: SourceOptions) -> dict[str, ImageSet]:
    root = ensure_stanford_dogs(options.quiet) if data == stanford_dogs.NAME else Path(data).expanduser()
    return stanford_dogs.load_stanford_dogs(root, options.crop_to_box, class_ids)
