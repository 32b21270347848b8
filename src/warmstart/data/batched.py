"""The batched image pipeline (`--pipeline gpu`): loader workers only read; decoding and
augmentation run for a whole batch at once on the run's device.

A worker hands over each image's JPEG bytes when the GPU's decoder can be trusted with it (a JPEG
whose header says RGB or grey and no EXIF rotation), otherwise its uint8 pixels (decoded on the CPU
exactly as the per-sample path does: PNG, CMYK, 16-bit, rotated, boxed; pre-resized image-cache
entries), with the random draws of its view. The draws are the per-sample path's own, replayed from
the same (seed, index), so a view shows the same crop and flip on both paths; only the interpolation
kernels differ (torch's antialiased resize against PIL's). On the device each image is decoded (nvJPEG,
a batch at once), cropped and resized; the batch is then scaled, normalised and flipped in one go.
Sizes are checked from the header before any byte is decoded, as on the per-sample path; an image
the device cannot decode falls back to the CPU decoder on its own, and one nobody can decode is
skipped with its reason, never the batch.

Memory is bounded by the view, not by the photos: pixels a worker decodes (anything but a plain
JPEG) are cropped and resized to the view's size on the worker whenever they are over
SHAPE_ON_WORKER_ABOVE times its pixels, so shared memory carries at most that per image; JPEG bytes
are at most the file (itself checked against its pixels), and the device decodes them in groups of
at most DEVICE_DECODE_PIXELS claimed pixels (a single larger image alone).
"""

from __future__ import annotations

import io
import math
import os
import queue
import threading
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import ExifTags
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torch.utils.data import Dataset

from .. import seeds
from .images import check_size, decode, encoded, open_image, open_lazily, stored_pixels
from .batch import Batch, readable_and_skipped, reason, unreadable
from .resample import SUPPORT, Axis, groups, resample, resample_with_pil

_RANDOM_CROPS = (RandomResizedCropAndInterpolation, T.RandomResizedCrop)
_GEOMETRY = (*_RANDOM_CROPS, T.Resize, T.CenterCrop)
_TO_TENSOR = (MaybeToTensor, T.ToTensor)
_SUPPORTED = (*_GEOMETRY, *_TO_TENSOR, T.RandomHorizontalFlip, T.Normalize)
SHAPE_ON_WORKER_ABOVE = 4  # times the view's pixels
DEVICE_DECODE_PIXELS = 64 << 20  # per nvJPEG call: about 200 MB of decoded RGB


@dataclass(frozen=True)
class TensorView:
    """A transform's steps (timm's and torchvision's crop, resize, flip, to-tensor, normalize),
    run on uint8 image tensors: per image until the size is fixed, then on the whole batch."""

    steps: tuple

    @classmethod
    def of(cls, transform) -> "TensorView | None":
        """The transform as tensor steps, or None where it has a step this pipeline does not run
        (colour jitter, auto-augment, …): such views stay on the per-sample path."""
        steps = tuple(getattr(transform, "transforms", [transform]))
        if not all(isinstance(step, _SUPPORTED) for step in steps):
            return None
        if sum(isinstance(step, _TO_TENSOR) for step in steps) != 1:
            return None
        if any(isinstance(step, _RANDOM_CROPS) for step in steps[1:]):
            return None  # a random crop draws from the image's own size: only as the first step
        geometry = [step for step in steps if isinstance(step, _GEOMETRY)]
        fixed = geometry and (not isinstance(geometry[-1], T.Resize) or not isinstance(geometry[-1].size, int)
                              and len(geometry[-1].size) == 2)
        return cls(steps) if fixed else None  # a batch needs one size

    @property
    def out_pixels(self) -> int:
        """Pixels of one image as the view leaves it (its last crop's or resize's size)."""
        size = next(step.size for step in reversed(self.steps) if isinstance(step, _GEOMETRY))
        height, width = (size, size) if isinstance(size, int) else (size[0], size[-1])
        return int(height) * int(width)

    def draw(self, width: int, height: int, item_seed: int | None, index: int) -> tuple:
        """The view's random choices for an image of this size: the per-sample path's own draws,
        in its order, from the same seeds (seeds.item_random)."""
        def draws() -> tuple:
            size = torch.empty((0, height, width))  # the image's size, without its pixels
            return tuple(step.get_params(size, step.scale, step.ratio) if isinstance(step, _RANDOM_CROPS)
                         else bool(torch.rand(1) < step.p) if isinstance(step, T.RandomHorizontalFlip)
                         else None for step in self.steps)

        if item_seed is None:
            return draws()
        with seeds.item_random(item_seed, index):
            return draws()

    def geometry(self, image: torch.Tensor, chosen: tuple) -> torch.Tensor:
        """One CHW image cropped, resized and flipped to the view's size: uint8 stays uint8 (rounded
        per image, as on a worker); float stays float, unrounded (rounded once per batch in finish)."""
        for step, choice in zip(self.steps, chosen):
            if isinstance(step, _TO_TENSOR):
                break
            if isinstance(step, _RANDOM_CROPS):
                top, left, h, w = _inside(choice, image.shape[-2], image.shape[-1])
                image = F.resized_crop(image, top, left, h, w, list(step.size), _mode(step.interpolation),
                                       antialias=True)
            elif isinstance(step, T.RandomHorizontalFlip):
                image = image.flip(-1) if choice else image
            else:
                image = step(image)  # Resize and CenterCrop run on tensors as they do on PIL images
        return image

    def axes(self, chosen: tuple, height: int, width: int) -> tuple[Axis, Axis, str] | None:
        """The view's geometry of an image of this size as one resample per axis (rows, columns) and
        its filter, for resample.resample; None where it is not one (two resizes in a row, a crop
        larger than the image, a filter other than PIL's bilinear or bicubic)."""
        rows, columns, kind, flipped = Axis(0, height, height, 0, height), Axis(0, width, width, 0, width), None, False
        for step, choice in zip(self.steps, chosen):
            if isinstance(step, _TO_TENSOR):
                break
            if isinstance(step, (*_RANDOM_CROPS, T.Resize)):
                mode = _mode(step.interpolation).value
                if kind is not None or flipped or mode not in SUPPORT or getattr(step, "max_size", None):
                    return None
                kind = mode
                if isinstance(step, _RANDOM_CROPS):
                    top, left, h, w = _inside(choice, height, width)
                    out_h, out_w = step.size
                    rows, columns = Axis(top, h, out_h, 0, out_h), Axis(left, w, out_w, 0, out_w)
                else:
                    out_h, out_w = _resized(step.size, height, width)
                    rows, columns = Axis(0, height, out_h, 0, out_h), Axis(0, width, out_w, 0, out_w)
            elif isinstance(step, T.CenterCrop):
                crop_h, crop_w = (step.size, step.size) if isinstance(step.size, int) else tuple(step.size)
                if flipped or crop_h > rows.count or crop_w > columns.count:
                    return None
                rows = replace(rows, first=rows.first + int(round((rows.count - crop_h) / 2.0)), count=crop_h)
                columns = replace(columns, first=columns.first + int(round((columns.count - crop_w) / 2.0)),
                                  count=crop_w)
            elif isinstance(step, T.RandomHorizontalFlip) and choice:
                columns, flipped = replace(columns, flip=not columns.flip), True
        return rows, columns, kind or "bilinear"  # no resize at all: the identity, whatever the filter

    def shaped(self, image: torch.Tensor, chosen: tuple) -> torch.Tensor:
        """One uint8 image at the view's size on a loader worker: through PIL, as the device stage
        computes it, where the geometry is one resample per axis (else torch's kernels)."""
        plan = self.axes(chosen, image.shape[-2], image.shape[-1])
        if plan is None or min(image.shape[-2:]) == 0:
            return self.geometry(image, chosen).contiguous()
        return resample_with_pil(image, *plan)

    def finish(self, batch: torch.Tensor, chosen: list[tuple]) -> torch.Tensor:
        """The steps from to-tensor on, for the whole NCHW batch at once: uint8, or float on the 0-255
        scale, clamped and rounded here as resizing uint8 images would have done one by one."""
        after = False
        for i, step in enumerate(self.steps):
            if isinstance(step, _TO_TENSOR):
                batch = batch.float() if batch.dtype == torch.uint8 else batch.clamp_(0, 255).round_()
                after, batch = True, batch.div_(255)
            elif after and isinstance(step, T.Normalize):
                mean = torch.as_tensor(step.mean, device=batch.device).view(1, -1, 1, 1)
                std = torch.as_tensor(step.std, device=batch.device).view(1, -1, 1, 1)
                batch = batch.sub_(mean).div_(std)
            elif after and isinstance(step, T.RandomHorizontalFlip):
                flip = torch.tensor([c[i] for c in chosen], device=batch.device)
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        return batch


def _resized(size, height: int, width: int) -> tuple[int, int]:
    """torchvision's output size of Resize(size) on an image of this size."""
    if isinstance(size, int) or len(size) == 1:
        short_side = size if isinstance(size, int) else size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(short_side * long / short)
        return (new_long, short_side) if width <= height else (short_side, new_long)
    return int(size[0]), int(size[1])


def _inside(box: tuple, height: int, width: int) -> tuple:
    """A drawn crop box at least one pixel each way and inside the image: timm's draw can give a
    0-pixel side on an image of a pixel or two."""
    top, left, h, w = box
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    return min(max(top, 0), height - h), min(max(left, 0), width - w), h, w


def _mode(interpolation):
    return interpolation if isinstance(interpolation, T.InterpolationMode) else T.InterpolationMode(interpolation)


# --- the workers' side: read, check, draw ---------------------------------------------------

_ORIENTATION = next(k for k, v in ExifTags.TAGS.items() if v == "Orientation")


def _as_tensor(pixels) -> torch.Tensor:
    """HWC uint8 -> CHW (a view). PIL's arrays are read-only; nothing here writes to them, and
    torch's warning about it would reach the user's terminal from every worker."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(pixels).permute(2, 0, 1)


def read(item, jpeg_bytes: bool = True) -> tuple[str, torch.Tensor, int, int]:
    """("jpeg", file bytes, w, h) for what the GPU decoder may take, else ("pixels", uint8 CHW, w, h)."""
    source = encoded(item) if jpeg_bytes else None  # a path, or a shard member's / a dataset row's bytes
    if source is not None:
        with open_lazily(source) as header:
            check_size(header.width, header.height)
            plain = (header.format == "JPEG" and header.mode in ("RGB", "L")
                     and header.getexif().get(_ORIENTATION, 1) == 1)
            width, height = header.size
        # a file far larger than its pixels (data appended to a small JPEG) is not read whole: PIL
        # decodes only what the image needs
        size = source.getbuffer().nbytes if isinstance(source, io.BytesIO) else os.path.getsize(source)
        if plain and size <= width * height * 3 + (16 << 20):
            data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
            return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), width, height
        if isinstance(source, io.BytesIO):  # decoded here rather than read a second time
            source.seek(0)
            tensor = _as_tensor(np.asarray(decode(source)))
            return "pixels", tensor, tensor.shape[-1], tensor.shape[-2]
    pixels = stored_pixels(item)
    tensor = _as_tensor(pixels if pixels is not None else np.asarray(open_image(item)))
    return "pixels", tensor, tensor.shape[-1], tensor.shape[-2]


@dataclass
class RawBatch:
    """What the workers hand over: per image its payload kind and data, its draws, its label."""

    kinds: list[str]  # "jpeg" (bytes), "pixels" (uint8 CHW), "shaped" (pixels already at the view's size)
    data: list[torch.Tensor]
    pixels: list[int]  # each image's claimed width x height
    chosen: list[tuple]
    names: list[str]
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]]
    skipped_indices: list[int]

    def __getstate__(self) -> dict:
        """Pickled (a loader worker hands it over) with every uint8 payload in one tensor: one
        shared-memory block per batch, not one per image, each of which costs the receiving
        process a file descriptor and a mapping."""
        state = dict(self.__dict__)
        if self.data and all(d.dtype == torch.uint8 for d in self.data):
            state["data"] = PackedPayloads([tuple(d.shape) for d in self.data],
                                           torch.cat([d.contiguous().view(-1) for d in self.data]))
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["data"], PackedPayloads):
            state["data"] = state["data"].unpacked()
        self.__dict__.update(state)


@dataclass
class PackedPayloads:
    shapes: list[tuple]
    flat: torch.Tensor

    def unpacked(self) -> list[torch.Tensor]:
        """Each payload as a view of the one tensor, in its shape (contiguous)."""
        sizes = [math.prod(shape) for shape in self.shapes]
        return [part.view(shape) for part, shape in zip(self.flat.split(sizes), self.shapes)]


class RawImageDataset(Dataset):
    """Each image read (not decoded where the device decodes it) with its view's draws; an image
    that cannot be read is reported, as on the per-sample path."""

    def __init__(self, images, view: TensorView, item_seed: int | None = None, jpeg_bytes: bool = True):
        self.images, self.view, self.item_seed, self.jpeg_bytes = images, view, item_seed, jpeg_bytes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        seed, index = key if isinstance(key, tuple) else (self.item_seed, key)
        item = self.images.items[index]
        try:
            kind, data, width, height = read(item, self.jpeg_bytes)
            chosen = self.view.draw(width, height, seed, index)
            if kind == "pixels" and width * height > SHAPE_ON_WORKER_ABOVE * self.view.out_pixels:
                kind, data = "shaped", self.view.shaped(data, chosen)  # small through shared memory
        except Exception as exc:  # any reading failure: report it, keep the run alive
            return unreadable(item, exc, index)
        return (kind, data, width * height, chosen, str(item)), self.images.labels[index], index


def collate_raw(samples) -> RawBatch:
    good, skipped, skipped_indices = readable_and_skipped(samples)
    kinds, data, pixels, chosen, names = ([s[0][field] for s in good] for field in range(5))
    return RawBatch(kinds, data, pixels, chosen, names, torch.tensor([s[1] for s in good], dtype=torch.long),
                    torch.tensor([s[2] for s in good], dtype=torch.long), skipped, skipped_indices)


# --- the device's side: decode, augment ------------------------------------------------------

@lru_cache(maxsize=None)
def device_decodes_jpeg(device: str) -> bool:
    """Whether torchvision decodes JPEGs on `device` (nvJPEG on CUDA): tried once on a tiny image."""
    if not device.startswith("cuda"):
        return False
    try:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        return nvjpeg_batch([data], torch.device(device))[0].shape == (3, 16, 16)
    except Exception:  # no nvJPEG in this build, or no usable GPU: workers decode instead
        return False


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One JPEG on the device, else on the CPU with PIL (what the per-sample path would decode)."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except Exception:
        image = decode(io.BytesIO(data.numpy().tobytes()))
        return _as_tensor(np.asarray(image)).to(device)


def nvjpeg_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEGs decoded on the GPU as one batch (nvJPEG): one bad file fails the whole call."""
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def pixel_groups(indices: list[int], pixels: list[int], budget: int) -> list[list[int]]:
    """The indices in order, grouped so that each group claims at most `budget` pixels (an image
    over it alone)."""
    groups, total = [], budget + 1
    for i in indices:
        if total + pixels[i] > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += pixels[i]
    return groups


def decode_all(kinds: list[str], data: list[torch.Tensor], device: torch.device, batch_decode=None,
               pixels: list[int] | None = None) -> list:
    """Each payload as a uint8 CHW tensor on `device`, or the exception that stopped it. JPEGs go
    through `batch_decode` in groups of at most DEVICE_DECODE_PIXELS claimed pixels where there is
    one; a group that fails is decoded one by one: a bad file costs only itself."""
    out: list = [None] * len(data)
    jpegs = [i for i, kind in enumerate(kinds) if kind == "jpeg"]
    if jpegs and batch_decode is not None:
        for group in pixel_groups(jpegs, pixels or [0] * len(data), DEVICE_DECODE_PIXELS):
            try:
                for i, image in zip(group, batch_decode([data[i] for i in group], device), strict=True):
                    out[i] = image
            except Exception:
                for i in group:
                    out[i] = None
    for i, kind in enumerate(kinds):
        if out[i] is not None:
            continue
        try:
            out[i] = _decode_one(data[i], device) if kind == "jpeg" else data[i].to(device, non_blocking=True)
        except Exception as exc:
            out[i] = exc
    return out


def runs_batched(transform, batched_on: torch.device | None) -> bool:
    """Whether a loader with this transform goes through the batched pipeline."""
    return batched_on is not None and TensorView.of(transform) is not None


class DevicePipeline:
    """RawBatch -> Batch: decoded and augmented on `device`, channels_last, float32 (under bf16 or
    fp16 autocast the first layer casts it, as it does the per-sample path's batches)."""

    def __init__(self, view: TensorView, device: torch.device, channels_last: bool = True, batch_decode=None):
        self.view, self.device, self.channels_last = view, torch.device(device), channels_last
        self.batch_decode = batch_decode or (nvjpeg_batch if device_decodes_jpeg(str(self.device)) else None)

    def __call__(self, raw: RawBatch) -> Batch:
        skipped, skipped_indices = list(raw.skipped), list(raw.skipped_indices)
        decoded = [ValueError(f"an image of {image.shape[-1]}x{image.shape[-2]} pixels: nothing to resize")
                   if not isinstance(image, Exception) and min(image.shape[-2:]) == 0 else image
                   for image in decode_all(raw.kinds, raw.data, self.device, self.batch_decode, raw.pixels)]
        shaped = self._resampled(decoded, raw)  # every readable image at once, or None
        images, keep = [], []
        for i, image in enumerate(decoded):
            if not isinstance(image, Exception):
                if shaped is not None:
                    keep.append(i)
                    continue
                try:
                    # resized in float: the uint8 path's per-image cast back and rounding (several small
                    # kernels each, the device stage's largest cost on an H200) happen once per batch
                    image = image.float()
                    images.append(image if raw.kinds[i] == "shaped" else self.view.geometry(image, raw.chosen[i]))
                    keep.append(i)
                    continue
                except RuntimeError as exc:  # a shape no resize takes: that image skipped, not the run
                    image = exc
            skipped.append((raw.names[i], reason(image)))
            skipped_indices.append(int(raw.indices[i]))
        if not keep:
            empty = torch.empty(0, dtype=torch.long)
            return Batch(torch.empty(0), empty, empty, skipped, skipped_indices)
        batch = self.view.finish(torch.stack(images) if shaped is None else shaped, [raw.chosen[i] for i in keep])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        keep_t = torch.tensor(keep, dtype=torch.long)
        return Batch(batch, raw.labels[keep_t], raw.indices[keep_t], skipped, skipped_indices)


    def _resampled(self, decoded: list, raw: RawBatch) -> torch.Tensor | None:
        """Every readable decoded image (in order) cropped, resized and flipped to the view in a constant number of
        operations per group (data.resample: PIL's own filters), or None where the view's geometry
        is not one resample per axis for some image (then each image goes its own way, as before)."""
        good = [i for i, image in enumerate(decoded) if not isinstance(image, Exception)]
        plans = {}
        for i in good:
            height, width = decoded[i].shape[-2:]
            plans[i] = ((Axis(0, height, height, 0, height), Axis(0, width, width, 0, width), None)
                        if raw.kinds[i] == "shaped" else self.view.axes(raw.chosen[i], height, width))
        if not good or any(plan is None for plan in plans.values()):
            return None
        kinds = {plan[2] for plan in plans.values()} - {None}
        if len(kinds) > 1 or len({(p[0].count, p[1].count) for p in plans.values()}) != 1:
            return None
        kind = kinds.pop() if kinds else "bilinear"
        parts = []
        for group in groups([tuple(decoded[i].shape[-2:]) for i in good]):
            members = [good[g] for g in group]
            parts.append(resample([decoded[i] for i in members], [plans[i][0] for i in members],
                                  [plans[i][1] for i in members], kind))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class DeviceBatches:
    """A DataLoader of RawBatches seen as Batches: each decoded and augmented by a background thread
    (on a CUDA device, in its own stream) while the previous batch trains, up to `ahead` batches."""

    def __init__(self, loader, pipeline: DevicePipeline, ahead: int = 2, threads: int | None = None):
        self.loader, self.pipeline, self.ahead = loader, pipeline, ahead
        self.threads = preparing_threads(pipeline.device) if threads is None else threads

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return prepared_ahead(self.loader, self.pipeline, self.pipeline.device, self.ahead, self.threads)


def preparing_threads(device: torch.device, cores: int | None = None) -> int:
    """Threads that prepare batches on `device`: one on a CPU (the loader's workers have the cores);
    on a GPU two where there are 8 cores or more, so that one batch's decode overlaps the previous
    one's resize (issue 35: one thread was ~85% busy on a 16-core H200 host), each in its own stream."""
    if torch.device(device).type != "cuda":
        return 1
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return 2 if cores >= 8 else 1


def prepared_ahead(items, prepare, device: torch.device, ahead: int = 2, threads: int = 1):
    """prepare(item) for each item by `threads` background threads, up to `ahead` ready before they
    are taken, in order (on a CUDA device each thread in its own side stream, which the consumer's
    stream then waits for): the device stage of a loader overlaps the work on the previous batch.
    Items are Batches, or (number, Batch) pairs of a loader of several passes."""
    local = threading.local()

    def run(item):
        if device.type != "cuda":
            return prepare(item), None
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(local.stream):
            out = prepare(item)
            ready = torch.cuda.Event()
            ready.record(local.stream)
        return out, ready

    for out, ready in ahead_of_time(items, run, ahead, threads):
        if ready is not None:  # the consumer's stream waits for the side stream's work, not the host
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            batch = out[1] if isinstance(out, tuple) else out
            if batch.images.is_cuda:
                batch.images.record_stream(current)
        yield out


def ahead_of_time(items, prepare, ahead: int, threads: int = 1):
    """prepare(item) for each item, by background threads, at most `ahead` ready before they are
    taken; in order. An error in a thread is raised here; leaving the loop early (a stop, an error,
    a break) stops the threads."""
    if threads > 1:
        yield from _ahead_in_a_pool(items, prepare, ahead, threads)
        return
    ready: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    done, stop = object(), threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("ok", prepare(item))):
                    return
            put(("ok", done))
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=work, name="warmstart-batches", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "error":
                raise value
            if value is done:
                return
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def _ahead_in_a_pool(items, prepare, ahead: int, threads: int):
    """ahead_of_time with several preparing threads: one reader hands items (a loader's batches, read
    in order: a DataLoader is not to be iterated from two threads) to a pool of `threads`, and the
    results come back in order, at most `ahead` + `threads` in flight."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="warmstart-batches")
    reader = ahead_of_time(items, lambda item: item, max(1, ahead))
    pending: deque = deque()
    try:
        for item in reader:
            pending.append(pool.submit(prepare, item))
            if len(pending) > ahead + threads - 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        reader.close()
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
