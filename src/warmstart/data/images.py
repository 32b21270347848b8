"""Opening images the way a user expects: EXIF orientation applied, always 8-bit RGB.

Items are file paths, in-memory arrays (embedded data), a `BoxedImage` (a file cropped to an
annotated box), or a stored file read by the item itself (`read_bytes()`: a shard's member, a
dataset's row). Anything that cannot be decoded raises; callers skip it and say so.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# system files that folders collect: never images, never worth a warning
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "icon\r"}
# decompression-bomb guard: PIL refuses images above twice this many pixels
DEFAULT_MAX_PIXELS = 89_478_485
# thin-image guard: resizing a 1x50,000 image to a 256-px short side would need 256x12.8M pixels;
# no photo is this elongated, so such files are refused before any pixel is decoded
MAX_ASPECT_RATIO = 20.0


@dataclass(frozen=True)
class BoxedImage:
    """A photo cropped to a box (left, top, right, bottom) in its original pixel coordinates."""

    path: str
    box: tuple[int, int, int, int]

    def __str__(self) -> str:
        return self.path


def is_hidden_or_system(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILES


def is_image_file(path: Path) -> bool:
    """A candidate image: right extension, not a hidden, resource-fork or system file."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden_or_system(path)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: scale to 8 bits (a plain convert would clip almost everything to white)
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return Image.fromarray(np.rint(array * (255.0 / peak)).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        return Image.fromarray(((array - array.min()) * (255.0 / span)).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # composite transparency on white, as viewers show it, rather than on black
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "RGB":
        image.load()
        return image  # no copy: a large image would need its memory twice
    return image.convert("RGB")


class ImageTooLarge(ValueError):
    """More pixels than the decompression-bomb limit, or too elongated to resize safely."""


def check_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect_ratio: float = MAX_ASPECT_RATIO) -> None:
    """Refuse, from the header alone, what would take too much memory to decode or to resize."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} pixels is over the {max_pixels:,}-pixel limit "
                            f"(decompression bomb guard)")
    ratio = max(width, height) / max(1, min(width, height))
    if min(width, height) < 1 or ratio > max_aspect_ratio:
        raise ImageTooLarge(f"{width}x{height} pixels has an aspect ratio over the limit of {max_aspect_ratio:g}:1 "
                            f"(resized to the model's input it would take {ratio:,.0f}x the pixels of a square image)")


def open_lazily(source) -> Image.Image:
    """The image's header only (no pixel decoded yet); PIL's own bomb refusal as ImageTooLarge."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused by check_size, clearly
            return Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc).split(", could be")[0] + " (decompression bomb guard)") from None


def readable_photos(images) -> int:
    """How many of the images open as images (their headers read, no pixels decoded)."""
    count = 0
    for item in images.items:
        path = encoded(item) or getattr(item, "path", None)  # a file, or the file a crop box is in
        if path is None:  # pixels in memory
            count += 1
            continue
        try:
            with open_lazily(path) as header:
                check_size(header.width, header.height)
                count += 1
        except Exception:  # unreadable, or over the limits: not a photo training would use
            continue
    return count


def decode(source, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO,
           box: tuple[int, int, int, int] | None = None, shrink=None) -> Image.Image:
    """A file path or file object to an RGB image: size checked from the header before any pixel is
    decoded (and again after cropping to `box`), EXIF orientation applied. `shrink` (a resize) is
    applied as early as gives the same pixels: a grey image is resized before it becomes RGB."""
    with open_lazily(source) as image:
        check_size(image.width, image.height, max_pixels, max_aspect_ratio)
        if box is not None:
            # annotation boxes are in the stored pixel grid: crop before applying EXIF orientation
            left, top, right, bottom = box
            image = image.crop((max(0, left), max(0, top), min(image.width, right), min(image.height, bottom)))
            check_size(image.width, image.height, max_pixels, max_aspect_ratio)
        image = ImageOps.exif_transpose(image, in_place=box is None) or image  # no copy when nothing turns
        if shrink is None:
            return to_rgb(image)
        if image.mode in ("1", "L"):  # three equal channels: resizing one is the same, at a third of the memory
            return shrink(image.convert("L")).convert("RGB")
        return shrink(to_rgb(image))


def item_key(item, stat) -> str:
    """What identifies an item's pixels for a cache key: an array's contents, a file's path with its
    `stat` (size and modification time) and crop box."""
    if isinstance(item, np.ndarray):
        return f"{hashlib.sha1(np.ascontiguousarray(item).tobytes()).hexdigest()}|{item.shape}\n"
    if isinstance(item, BoxedImage):
        return f"{item.path}|{item.box}|{stat(item.path)}\n"
    if hasattr(item, "stat_key"):  # a stored file read by the item: where it lies, and its container's stat
        return item.stat_key(stat) + "\n"
    return f"{item}|{stat(str(item))}\n"


def whole_file(item) -> str | None:
    """The path of an item that is a whole image file as it is stored (not an array, a crop box or a
    cache entry): what a loader may hand over as the file's bytes."""
    return str(item) if isinstance(item, (str, Path)) else None


def encoded(item):
    """What holds an item's encoded file as it is stored, for PIL to open: a path, the bytes of a
    shard member or a dataset row (read here, bounded by their source's limits), else None."""
    if hasattr(item, "read_bytes"):
        return io.BytesIO(item.read_bytes())
    return whole_file(item)


def stored_pixels(item) -> np.ndarray | None:
    """An item's pixels where they are already decoded (an array, an image-cache entry), else None."""
    if isinstance(item, np.ndarray):
        return item if item.ndim == 3 and item.shape[2] == 3 and item.dtype == np.uint8 else None
    return item.pixels() if hasattr(item, "pixels") else None


def open_image(item, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one item to an RGB PIL image (raises on unreadable files)."""
    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert("RGB")
    if hasattr(item, "pixels"):  # a pre-resized image cache entry
        return Image.fromarray(item.pixels())
    if isinstance(item, BoxedImage):
        return decode(item.path, max_pixels, box=item.box)
    return decode(encoded(item), max_pixels)
