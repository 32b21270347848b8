"""Crop and resize a whole batch of differently sized images in a constant number of operations,
with PIL's own antialiased filters: the batched pipeline's device stage (issue 35).

PIL resizes an 8-bit image in two passes, horizontal then vertical (ImagingResample). Each output
pixel of a pass is a weighted sum of the input pixels within ±support·max(scale, 1) of its centre
`(j + 0.5)·scale`, the weights `filter((x − centre + 0.5) / max(scale, 1))` normalised to sum 1 and
held in 22-bit fixed point, and each pass is rounded to 8 bits. A pass is therefore a matrix
product, `pixels @ Wᵀ` with W[out, in] those weights: cropping is a window of W's columns, a
centre crop after a resize a window of its rows, a horizontal flip its rows reversed. Per image W
differs (its box, its size), so W is built for the whole batch at once by broadcasting, the images
are padded to the group's largest (zero weight beyond each image), and the batch's crop, resize,
flip and both roundings are two batched matrix products and ~30 element-wise operations, however
many images there are. The products are of 8-bit pixels and PIL's integer weights in float64, exact,
so each pixel is PIL's. PIL's passes go in the order it chooses per image (vertical_first).

Filters (PIL's, Imaging/Resample.c): bilinear is the triangle of support 1; bicubic the cubic
convolution kernel with a = −0.5, support 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

PRECISION = 2.0 ** 22  # PIL's fixed-point weights: 32 - 8 - 2 bits
SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
# padded pixels (height x width x images) resampled at once: each group holds its images in float64,
# with an int64 index of the same size: ~50 bytes a padded pixel of a 3-channel group (800 MB)
GROUP_PIXELS = 16 << 20


def _filter(kind: str, x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    if kind == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


@dataclass(frozen=True)
class Axis:
    """One axis of one image's geometry: input pixels [start, start + length) resampled to `total`
    pixels, of which `count` are kept from `first` on (a centre crop after a resize), reversed if
    `flip`."""

    start: int
    length: int
    total: int
    first: int
    count: int
    flip: bool = False


def weights(axes: list[Axis], padded: int, kind: str, device) -> torch.Tensor:
    """[images, count, padded] float64: PIL's weights of each image's axis (all the same `count`) as
    its fixed-point integers (the weight times 2^22), so that every sum of a pass is exact."""
    numbers = torch.tensor([[a.start, a.length, a.total, a.first] for a in axes], dtype=torch.float64, device=device)
    start, length, total, first = (numbers[:, i].view(-1, 1, 1) for i in range(4))
    count = axes[0].count
    scale = length / total
    filterscale = scale.clamp(min=1.0)
    support = SUPPORT[kind] * filterscale
    j = first + torch.arange(count, dtype=torch.float64, device=device).view(1, -1, 1)
    centre = (j + 0.5) * scale  # relative to the crop's start, as PIL computes on the cropped image
    low = torch.floor(centre - support + 0.5).clamp(min=0.0)
    high = torch.minimum(torch.floor(centre + support + 0.5), length)
    x = torch.arange(padded, dtype=torch.float64, device=device).view(1, 1, -1) - start
    w = _filter(kind, (x - centre + 0.5) / filterscale) * ((x >= low) & (x < high))
    total_weight = w.sum(-1, keepdim=True)
    w = w / torch.where(total_weight == 0, torch.ones_like(total_weight), total_weight)
    w = torch.sign(w) * torch.floor(w.abs() * PRECISION + 0.5)  # PIL's fixed-point integers
    flips = torch.tensor([a.flip for a in axes], device=device).view(-1, 1, 1)
    return torch.where(flips, w.flip(1), w)


def pad(images: list[torch.Tensor]) -> torch.Tensor:
    """[N, C, H, W] float64 of CHW uint8 images of different sizes, zero beyond each: one concatenation
    and one gather (no operation per image; a view of each is taken for the concatenation)."""
    device, channels = images[0].device, images[0].shape[0]
    sizes = torch.tensor([[im.shape[-2], im.shape[-1]] for im in images], dtype=torch.int64)
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    flat = torch.cat([im.reshape(-1) for im in images])
    areas = sizes[:, 0] * sizes[:, 1]
    offsets = torch.cumsum(areas * channels, 0) - areas * channels
    numbers = torch.stack([offsets, sizes[:, 0], sizes[:, 1]], 1).to(device, non_blocking=True)
    offset, h, w = (numbers[:, i].view(-1, 1, 1, 1) for i in range(3))
    c = torch.arange(channels, device=device).view(1, -1, 1, 1)
    y = torch.arange(height, device=device).view(1, 1, -1, 1)
    x = torch.arange(width, device=device).view(1, 1, 1, -1)
    inside = (y < h) & (x < w)
    index = torch.where(inside, offset + (c * h + y) * w + x, torch.zeros((), dtype=torch.int64, device=device))
    return flat[index].double() * inside


def _rounded(sums: torch.Tensor) -> torch.Tensor:
    """PIL's clip8 of a fixed-point sum (pixels times integer weights, exact in float64)."""
    return torch.floor((sums + PRECISION / 2) / PRECISION).clamp(0.0, 255.0)


def vertical_first(rows: Axis, columns: Axis) -> bool:
    """Whether PIL runs this resize's vertical pass first (Pillow 13's Resample.c: when the height
    shrinks by more than twice what the width does; the order changes each pass's rounding). An
    older Pillow that always goes horizontally first is recognised once (pillow_order)."""
    shrink_h, shrink_w = rows.length - rows.total, columns.length - columns.total
    return pillow_order() and shrink_h > 0 and shrink_h > 2 * shrink_w


@lru_cache(maxsize=1)
def pillow_order() -> bool:
    """Whether the installed Pillow chooses its pass order (True) or always goes horizontally first:
    one 40x6 -> 13x3 bicubic resize, where the two orders round differently, compared."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 6, 3), dtype=np.uint8)
    expected = torch.from_numpy(np.asarray(Image.fromarray(pixels).resize((13, 3), Image.BICUBIC)).copy())
    rows, columns = Axis(0, 40, 3, 0, 3), Axis(0, 6, 13, 0, 13)
    image = pad([torch.from_numpy(pixels).permute(2, 0, 1).contiguous()])
    down, across = weights([rows], 40, "bicubic", "cpu"), weights([columns], 6, "bicubic", "cpu")
    vertical = _rounded(_rounded(down.unsqueeze(1) @ image) @ across.transpose(1, 2).unsqueeze(1))
    return torch.equal(vertical[0].permute(1, 2, 0).to(torch.uint8), expected)


def resample(images: list[torch.Tensor], rows: list[Axis], columns: list[Axis], kind: str) -> torch.Tensor:
    """[N, C, rows' count, columns' count] float32 on the 0-255 scale, rounded as PIL's uint8 passes
    are (exactly: the sums are of integers, in float64): each image cropped, resized, windowed and flipped as its axes say, its two passes in
    PIL's order for its sizes (where the batch holds both orders, both are computed and each image
    takes its own: still a constant number of operations)."""
    padded = pad(images)
    across = weights(columns, padded.shape[-1], kind, padded.device).transpose(1, 2).unsqueeze(1)  # [N, 1, W, w]
    down = weights(rows, padded.shape[-2], kind, padded.device).unsqueeze(1)  # [N, 1, h, H]
    firsts = [vertical_first(r, c) for r, c in zip(rows, columns)]
    horizontal = None if all(firsts) else _rounded(down @ _rounded(padded @ across))
    vertical = _rounded(_rounded(down @ padded) @ across) if any(firsts) else None
    if vertical is None or horizontal is None:
        return (horizontal if vertical is None else vertical).float()
    chosen = torch.tensor(firsts, device=padded.device).view(-1, 1, 1, 1)
    return torch.where(chosen, vertical, horizontal).float()


def groups(shapes: list[tuple[int, int]], budget: int = GROUP_PIXELS) -> list[list[int]]:
    """Consecutive images in groups whose padded size (count x largest height x largest width)
    stays within `budget` pixels (an image larger than that alone)."""
    out, current, height, width = [], [], 0, 0
    for i, (h, w) in enumerate(shapes):
        grown = (len(current) + 1) * max(height, h) * max(width, w)
        if current and grown > budget:
            out.append(current)
            current, height, width = [], 0, 0
        current.append(i)
        height, width = max(height, h), max(width, w)
    return out + ([current] if current else [])


def resample_with_pil(image: torch.Tensor, rows: Axis, columns: Axis, kind: str) -> torch.Tensor:
    """One CHW uint8 image through PIL itself as `resample` computes it: crop, resize, window, flip.
    The exact reference, and how a loader worker shapes a large image before it crosses shared
    memory (PIL needs no float copy of a 12-Mpixel photo)."""
    from PIL import Image

    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    picture = picture.crop((columns.start, rows.start, columns.start + columns.length, rows.start + rows.length))
    if (picture.width, picture.height) != (columns.total, rows.total):
        resampling = Image.Resampling.BICUBIC if kind == "bicubic" else Image.Resampling.BILINEAR
        picture = picture.resize((columns.total, rows.total), resampling)
    picture = picture.crop((columns.first, rows.first, columns.first + columns.count, rows.first + rows.count))
    if columns.flip:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()
