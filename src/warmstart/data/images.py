"""Opening images the way a user expects: EXIF orientation applied, always RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def is_image_file(path: Path) -> bool:
    """A candidate image: right extension, not a hidden or macOS resource-fork file."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def open_image(item: "str | Path | np.ndarray") -> Image.Image:
    """Decode one item to an RGB PIL image. Raises on unreadable files (callers skip those)."""
    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert("RGB")
    with Image.open(item) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # composite transparency on white rather than black, as viewers show it
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
