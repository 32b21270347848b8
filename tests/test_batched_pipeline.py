"""The batched image pipeline (--pipeline gpu), run on CPU tensors: the same views as the per-sample
path (same crops and flips from the same seeds; interpolation within a grey level), the GPU decoder's
fallbacks, and whole runs through it."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from conftest import require_shared
from warmstart.data.batched import (DevicePipeline, RawBatch, RawImageDataset, TensorView, collate_raw, decode_all,
                                    device_decodes_jpeg, read)
from warmstart.data.loaders import EpochBatches, ImageDataset, collate_skipping, make_loader
from warmstart.data.resample import Axis, resample, resample_with_pil
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import eval_transform, mirrored_eval_transform, train_transform

CPU = torch.device("cpu")
LEVEL = 1 / 255 / 0.5  # one grey level in the bundled models' normalisation (std 0.5)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29


def _woof(n: int = 24):
    root = require_shared("imagewoof-mini")
    val = resolve_splits(str(root), 0.0, 0)["val"]
    return val.subset(range(0, len(val), max(1, len(val) // n))[:n])


def _both(images, transform, seed):
    """The per-sample path's batch and the batched pipeline's (JPEG bytes decoded here)."""
    view = TensorView.of(transform)
    pil = collate_skipping([ImageDataset(images, transform, seed)[i] for i in range(len(images))])
    raw = collate_raw([RawImageDataset(images, view, seed)[i] for i in range(len(images))])
    return pil, DevicePipeline(view, CPU, channels_last=False)(raw), raw


@pytest.mark.parametrize("which", ["eval", "train", "mirror", "imagenet-bilinear-train"])
def test_views_match_the_per_sample_path_on_real_photos(which):
    images = _woof()
    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.875}
    transform = {"eval": lambda: eval_transform(config), "train": lambda: train_transform(config, "standard"),
                 "mirror": lambda: mirrored_eval_transform(config),
                 "imagenet-bilinear-train": lambda: train_transform(
                     {**config, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                      "std": (0.229, 0.224, 0.225)}, "standard")}[which]()
    pil, batched, raw = _both(images, transform, 1234 if "train" in which else None)
    assert raw.kinds == ["jpeg"] * len(images)  # plain photos travel as bytes
    assert batched.images.shape == pil.images.shape == (len(images), 3, 224, 224)
    assert torch.equal(batched.labels, pil.labels)
    # the same crop and flip, resampled with PIL's own filters in PIL's pass order (data.resample), from
    # the same libjpeg-turbo decode: bit for bit the per-sample path's batch (before issue 35, torch's
    # antialiased kernels: 0.3 grey levels apart on average, 1 at the 99th percentile)
    assert torch.equal(batched.images, pil.images)


def test_a_view_depends_only_on_seed_and_index():
    images = _woof(16)
    transform = train_transform(data_config_for_lite0(), "standard")
    seen = {}
    for workers, seed in ((0, 5), (2, 5)):
        order = EpochBatches(images.labels, 4, seed)
        order.set_epoch(1)
        for batch in make_loader(images, transform, 4, workers, order, batched_on=CPU):
            for index, image in zip(batch.indices.tolist(), batch.images):
                if index in seen:
                    assert torch.equal(seen[index], image)
                seen[index] = image
    assert len(seen) == len(images)
    again = EpochBatches(images.labels, 4, 5)
    again.set_epoch(2)  # another epoch: other crops
    batch = next(iter(make_loader(images, transform, 4, 0, again, batched_on=CPU)))
    assert not torch.equal(batch.images[0], seen[int(batch.indices[0])])


def data_config_for_lite0():
    return {"input_size": (3, 96, 96), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
            "crop_pct": 0.875}


def _photo(path, mode="RGB", fmt="JPEG", orientation=None, size=(120, 90)):
    rng = np.random.default_rng(len(str(path)))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    kwargs = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, format=fmt, **kwargs)
    return str(path)


@pytest.fixture()
def odd_files(tmp_path):
    from warmstart.data.imageset import ImageSet

    good = _photo(tmp_path / "plain.jpg")
    files = {
        "plain": good, "grey": _photo(tmp_path / "grey.jpg", "L"), "cmyk": _photo(tmp_path / "cmyk.jpg", "CMYK"),
        "png": _photo(tmp_path / "image.png", fmt="PNG"), "rotated": _photo(tmp_path / "rotated.jpg", orientation=6),
    }
    broken = tmp_path / "broken.jpg"  # a JPEG header, then noise: readable header, undecodable body
    data = open(good, "rb").read()
    broken.write_bytes(data[:600] + bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8)))
    (tmp_path / "text.jpg").write_text("not an image")
    files["broken"], files["text"] = str(broken), str(tmp_path / "text.jpg")
    names = list(files)
    return names, ImageSet([files[n] for n in names], list(range(len(names))), [f"c{i}" for i in range(len(names))],
                           names)


def test_what_the_gpu_decoder_cannot_take_is_decoded_on_the_cpu(odd_files):
    names, images = odd_files
    view = TensorView.of(eval_transform(data_config_for_lite0()))
    kinds = {}
    for name, item in zip(names, images.items):
        try:
            kinds[name] = read(item)[0]
        except Exception:
            kinds[name] = "unreadable"
    assert kinds == {"plain": "jpeg", "grey": "jpeg", "cmyk": "pixels", "png": "pixels", "rotated": "pixels",
                     "broken": "jpeg", "text": "unreadable"}
    assert read(images.items[names.index("rotated")])[1].shape == (3, 120, 90)  # EXIF rotation applied
    padded = images.items[names.index("plain")] + ".padded.jpg"  # 20 MB behind a 120x90 JPEG: not read whole
    with open(padded, "wb") as out:
        out.write(open(images.items[names.index("plain")], "rb").read() + bytes(20 << 20))
    assert read(padded)[0] == "pixels" and read(padded)[1].shape == (3, 90, 120)
    pil = collate_skipping([ImageDataset(images, eval_transform(data_config_for_lite0()))[i] for i in range(len(names))])
    batch = DevicePipeline(view, CPU, channels_last=False)(
        collate_raw([RawImageDataset(images, view)[i] for i in range(len(names))]))
    # every image PIL decodes is in the batch (the broken one too where PIL makes something of it)
    assert batch.indices.tolist() == pil.indices.tolist()
    assert sorted(i for i in batch.skipped_indices) == sorted(pil.skipped_indices)
    assert names.index("text") in batch.skipped_indices
    assert (batch.images - pil.images).abs().mean() < 0.3 * LEVEL


def test_a_failing_batch_decode_falls_back_image_by_image(odd_files):
    names, images = odd_files
    jpegs = [i for i, n in enumerate(names) if n in ("plain", "grey", "broken")]
    payloads = [read(images.items[i]) for i in jpegs]
    kinds, data = [p[0] for p in payloads], [p[1] for p in payloads]
    calls = []

    def batch_decode(batch, device):  # as nvJPEG: one bad file fails the whole call
        calls.append(len(batch))
        return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)

    decoded = decode_all(kinds, data, CPU, batch_decode)
    assert calls == [3]
    assert [d.shape if isinstance(d, torch.Tensor) else "error" for d in decoded][:2] == [(3, 90, 120)] * 2
    assert torch.equal(decoded[0], decode_jpeg(data[0], mode=ImageReadMode.RGB))
    good_only = decode_all(kinds[:2], data[:2], CPU, batch_decode)
    assert calls == [3, 2] and all(isinstance(d, torch.Tensor) for d in good_only)


def test_views_the_pipeline_cannot_run_stay_per_sample():
    jitter = T.Compose([T.RandomResizedCrop(64), T.ColorJitter(0.4), T.ToTensor()])
    assert TensorView.of(jitter) is None
    assert TensorView.of(T.Compose([T.Resize(64), T.ToTensor()])) is None  # sizes vary: no batch
    assert TensorView.of(T.Compose([T.Resize((64, 48)), T.ToTensor()])) is not None
    assert isinstance(make_loader(_woof(4), jitter, 2, 0, batched_on=CPU), torch.utils.data.DataLoader)
    assert not device_decodes_jpeg("cpu")  # a CPU's workers decode; bytes travel only to a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: --pipeline gpu is no mistake")
def test_pipeline_gpu_without_cuda_is_one_line(tmp_path, color_tree, capsys):
    from warmstart.cli import main

    code = main(["train", "--data", str(color_tree), "--out", str(tmp_path / "run"), "--pipeline", "gpu",
                 "--epochs", "1", "--input-size", "64"])
    out, err = capsys.readouterr()
    assert code == 2 and "\n" not in err.strip() and "--pipeline gpu needs a CUDA GPU" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert "weights from" not in out and "data:" not in out  # nor read


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["feature-extractor", "fine-tune"])
def test_runs_through_the_batched_pipeline(tmp_path, color_tree, monkeypatch, recipe):
    """A whole run with the batched pipeline on CPU tensors (what --pipeline gpu runs on a GPU):
    every loader goes through it, and the run matches the per-sample path's, epoch by epoch."""
    import warmstart
    from warmstart.data import batched
    from warmstart.compute import runtime

    settings = {"data": str(color_tree), "recipe": recipe, "epochs": 2, "batch_size": 8, "input_size": 64,
                "workers": 0, "quiet": True, "seed": 0, "lr": 0.01 if recipe == "feature-extractor" else 1e-3}
    per_sample = warmstart.train(warmstart.RunConfig.from_dict({**settings, "out": str(tmp_path / "per-sample")}))
    calls = []
    original = batched.DevicePipeline.__call__
    monkeypatch.setattr(batched.DevicePipeline, "__call__", lambda self, raw: calls.append(1) or original(self, raw))
    monkeypatch.setattr(runtime, "resolve_pipeline", lambda choice, device: "gpu")
    result = warmstart.train(warmstart.RunConfig.from_dict({**settings, "out": str(tmp_path / "batched")}))
    # training views, validation and the final evaluation: 36 train + 12 val images, batches of 8 (64 to evaluate)
    assert len(calls) >= (3 if recipe == "feature-extractor" else 2 * 5 + 2)
    for ours, theirs in zip(result.history, per_sample.history, strict=True):
        assert abs(ours["train_loss"] - theirs["train_loss"]) < 0.02 * max(1.0, theirs["train_loss"])
    if recipe == "feature-extractor":  # (two epochs of fine-tuning leave val images on the fence: not compared)
        assert result.metrics["top1"] == per_sample.metrics["top1"] == 1.0


def test_batches_are_prepared_ahead_in_order_and_errors_reach_the_loop():
    import threading
    import time

    from warmstart.data.batched import ahead_of_time

    threads = set()

    def prepare(i):
        threads.add(threading.current_thread().name)
        return i * i

    assert list(ahead_of_time(range(20), prepare, 2)) == [i * i for i in range(20)]
    assert threads == {"warmstart-batches"}  # not the consumer's thread

    def broken(i):
        if i == 3:
            raise OSError("disk gone")
        return i

    with pytest.raises(OSError, match="disk gone"):
        list(ahead_of_time(range(10), broken, 2))
    # leaving early stops the producer: it never runs far ahead of what was taken
    made = []
    taken = ahead_of_time(range(1000), lambda i: made.append(i) or i, 2)
    assert [next(taken) for _ in range(3)] == [0, 1, 2]
    taken.close()
    time.sleep(0.3)
    assert len(made) <= 3 + 2 + 1


@pytest.mark.slow
def test_exact_resume_through_the_batched_pipeline(tmp_path, color_tree, monkeypatch):
    """Stopped mid-epoch and resumed, a run on the batched pipeline ends with the weights of an
    uninterrupted one: its views depend only on (seed, epoch, index), as on the per-sample path."""
    import os
    import signal

    from safetensors.torch import load_file

    import warmstart
    from warmstart.data import batched
    from warmstart.compute import runtime
    from warmstart.train.checkpoint import TrainingInterrupted

    monkeypatch.setattr(runtime, "resolve_pipeline", lambda choice, device: "gpu")
    settings = {"data": str(color_tree), "strategy": "fine-tune", "augment": "standard", "epochs": 2, "batch_size": 4,
                "input_size": 64, "workers": 0, "lr": 0.02, "seed": 5, "quiet": True}
    reference = warmstart.train(warmstart.RunConfig.from_dict({**settings, "out": str(tmp_path / "reference")}))
    calls, original = [], batched.DevicePipeline.__call__

    def stop_at_sixth(self, raw):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, raw)

    monkeypatch.setattr(batched.DevicePipeline, "__call__", stop_at_sixth)
    config = warmstart.RunConfig.from_dict({**settings, "out": str(tmp_path / "stopped")})
    with pytest.raises(TrainingInterrupted) as stopped:
        warmstart.train(config)
    step = torch.load(stopped.value.checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 2 * 9  # stopped inside the first epoch's 9 batches or the second's
    monkeypatch.setattr(batched.DevicePipeline, "__call__", original)
    resumed = warmstart.train(config, resume=str(tmp_path / "stopped"))
    ours, theirs = load_file(str(resumed.run_dir / "model.safetensors")), load_file(str(reference.run_dir / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_loader_batches_are_pinned_when_the_loader_pins(monkeypatch):
    """DataLoader(pin_memory=True) pins what it knows how to: a Batch says how (alone, or tagged
    with its pass number by passes_loader)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from warmstart.data.batch import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: pinned.append(self.shape) or self.clone())
    batch = Batch(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([4, 5]), [], [])
    number, out = pin_memory((3, batch))
    assert number == 3 and isinstance(out, Batch) and torch.equal(out.images, batch.images)
    assert pinned == [torch.Size([2, 3, 8, 8]), torch.Size([2])]


def test_eval_and_report_compute_as_the_run_did(tmp_path, color_tree, monkeypatch):
    """A run saved with bf16 and the batched pipeline: `warmstart eval` and `report` load its images
    through that pipeline and compute under bf16 autocast (its saved config plus this machine),
    and extraction prepares batches ahead in the background, as training does."""
    import threading

    import warmstart
    from warmstart.cli import main
    from warmstart.compute import runtime
    from warmstart.data import batched

    monkeypatch.setattr(runtime, "resolve_pipeline", lambda choice, device: "gpu")
    threads = []
    original = batched.DevicePipeline.__call__
    monkeypatch.setattr(batched.DevicePipeline, "__call__",
                        lambda self, raw: threads.append(threading.current_thread().name) or original(self, raw))
    run = warmstart.train(warmstart.RunConfig(data=str(color_tree), precision="bf16", augment="none", epochs=1,
                                              input_size=32, workers=0, quiet=True, out=str(tmp_path / "r")))
    assert threads and set(threads) == {"warmstart-batches"}  # extraction's device stage ran ahead
    seen = []

    def first_conv(module, args):  # on the run's 32-px images (a folding check runs at 224 px)
        if isinstance(module, torch.nn.Conv2d) and not seen and args[0].shape[-1] == 32:
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)

    for command in (["eval", str(run.run_dir)], ["report", str(run.run_dir)]):
        threads.clear(), seen.clear()
        hook = torch.nn.modules.module.register_module_forward_pre_hook(first_conv)
        try:
            assert main(command) == 0
        finally:
            hook.remove()
        assert threads, f"{command[0]} did not load through the batched pipeline"
        assert seen and all(seen), f"{command[0]} did not compute under the run's bf16 autocast"


def test_a_tiny_image_is_cropped_sensibly_not_the_end_of_the_run(tmp_path):
    """timm's random-resized crop can draw a 0-pixel side on a 1- or 2-pixel image: the batched
    pipeline crops at least one pixel inside the image and the batch goes on; an image whose shape
    nothing can resize is skipped with its reason, the others kept."""
    from warmstart.data.imageset import ImageSet

    transform = train_transform(data_config_for_lite0(), "standard")
    view = TensorView.of(transform)
    files = [_photo(tmp_path / "plain.jpg")]
    for side in (1, 2):
        Image.new("RGB", (side, side), (255, 0, 0)).save(tmp_path / f"tiny{side}.png")
        files.append(str(tmp_path / f"tiny{side}.png"))
    images = ImageSet(files, [0, 1, 1], ["a", "b"], files)
    zero_box = (0, 0, 0, 1)  # what timm draws for a 1x1 image with a small scale
    assert view.geometry(torch.zeros(3, 1, 1, dtype=torch.uint8), (zero_box, False, None, None)).shape == (3, 96, 96)
    for seed in range(20):  # many draws: none ends the batch
        batch = DevicePipeline(view, CPU, channels_last=False)(
            collate_raw([RawImageDataset(images, view, seed)[i] for i in range(3)]))
        assert batch.indices.tolist() == [0, 1, 2] and batch.images.shape == (3, 3, 96, 96)
    raw = collate_raw([RawImageDataset(images, view, 0)[i] for i in range(3)])
    raw.data[1] = torch.zeros(3, 0, 5, dtype=torch.uint8)  # no pixels at all: nothing resizes it
    batch = DevicePipeline(view, CPU, channels_last=False)(raw)
    assert batch.indices.tolist() == [0, 2] and batch.skipped_indices == [1]


def test_pixels_decoded_on_workers_cross_shared_memory_at_the_views_size(tmp_path):
    """What the GPU decoder does not take (a PNG, an EXIF-rotated phone photo) is decoded by the
    worker and, when large, cropped and resized there: it crosses shared memory at most
    SHAPE_ON_WORKER_ABOVE times the view's pixels, and the batch equals the per-sample path's."""
    from warmstart.data import batched
    from warmstart.data.imageset import ImageSet

    files = [_photo(tmp_path / "big.png", fmt="PNG", size=(1200, 900)),
             _photo(tmp_path / "portrait.jpg", orientation=6, size=(1600, 1200)),
             _photo(tmp_path / "small.png", fmt="PNG", size=(120, 90))]
    images = ImageSet(files, [0, 1, 0], ["a", "b"], files)
    for name, transform, seed in (("train", train_transform(data_config_for_lite0(), "standard"), 3),
                                  ("eval", eval_transform(data_config_for_lite0()), None)):
        view = TensorView.of(transform)
        samples = [RawImageDataset(images, view, seed)[i] for i in range(3)]
        raw = collate_raw(samples)
        assert raw.kinds == ["shaped", "shaped", "pixels"], name
        bound = 3 * batched.SHAPE_ON_WORKER_ABOVE * view.out_pixels
        assert all(d.numel() <= bound for d in raw.data), name
        pil = collate_skipping([ImageDataset(images, transform, seed)[i] for i in range(3)])
        batch = DevicePipeline(view, CPU, channels_last=False)(raw)
        assert (batch.images - pil.images).abs().mean() < 0.3 * LEVEL, name


def test_the_device_stage_is_pil_pixel_for_pixel_bicubic_and_bilinear_up_and_down():
    """The batch's crop + resize (data.resample: two batched matrix products of PIL's fixed-point
    weights) equals PIL resizing each image, bit for bit: real photos through the training and the
    evaluation views, and synthetic images from 1x1 to 2,000 px, upscaled and downscaled."""
    images = _woof(8)
    config = {"input_size": (3, 160, 160), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.875}
    for transform, seed in ((train_transform(config, "standard"), 7),
                            (eval_transform({**config, "interpolation": "bilinear"}), None)):
        view = TensorView.of(transform)
        raw = collate_raw([RawImageDataset(images, view, seed)[i] for i in range(len(images))])
        batch = DevicePipeline(view, CPU, channels_last=False)(raw)
        decoded = decode_all(raw.kinds, raw.data, CPU)
        by_pil = torch.stack([resample_with_pil(image, *view.axes(chosen, *image.shape[-2:]))
                              for image, chosen in zip(decoded, raw.chosen)])
        assert torch.equal(batch.images, view.finish(by_pil, raw.chosen))
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 1), (2, 3), (7, 300), (700, 40), (480, 640), (33, 17), (500, 650), (64, 64)]
    pictures = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]
    for kind in ("bicubic", "bilinear"):
        for out in ((5, 9), (40, 64)):  # down from most, up from the small ones (1x1, 2x3, 33x17, 7 rows)
            rows = [Axis(h // 5, h - h // 5, out[0], 0, out[0]) for h, _ in shapes]
            columns = [Axis(0, w, out[1], 0, out[1], flip=i % 2 == 1) for i, (_, w) in enumerate(shapes)]
            batched = resample(pictures, rows, columns, kind)
            for i, picture in enumerate(pictures):
                assert torch.equal(batched[i].to(torch.uint8), resample_with_pil(picture, rows[i], columns[i], kind))


def test_the_device_stage_launches_as_many_operations_for_256_images_as_for_32():
    """Issue 35: the crop + resize + flip + normalise of a batch is a constant number of operations
    (counted by the torch profiler on CPU tensors, views excepted: they launch nothing), however many
    images and whatever their sizes; before, several small kernels per image."""
    from torch.profiler import profile

    view = TensorView.of(train_transform({"input_size": (3, 32, 32), "interpolation": "bicubic",
                                          "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}, "standard"))
    pipeline, generator = DevicePipeline(view, CPU, channels_last=False), torch.Generator().manual_seed(0)
    views = {"view", "reshape", "_reshape_alias", "as_strided", "expand", "unsqueeze", "transpose", "permute",
             "select", "slice", "alias", "detach", "lift_fresh", "t", "flatten", "unflatten", "squeeze", "narrow",
             "_unsafe_view"}

    def launched(count: int) -> int:
        sizes = torch.randint(20, 60, (count, 2), generator=generator).tolist()
        pictures = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
        chosen = [view.draw(w, h, 0, i) for i, (h, w) in enumerate(sizes)]
        raw = RawBatch(["pixels"] * count, pictures, [h * w for h, w in sizes], chosen, [str(i) for i in range(count)],
                       torch.zeros(count, dtype=torch.long), torch.arange(count), [], [])
        with profile() as trace:
            shaped = pipeline._resampled(pictures, raw)
            view.finish(shaped, chosen)
        return sum(1 for event in trace.events() if event.name.startswith("aten::")
                   and event.name[len("aten::"):] not in views)

    launched(4)  # the first call also checks the installed Pillow's pass order (once per process)
    small, large = launched(32), launched(256)
    assert small == large and small < 400, (small, large)  # measured: 332 (nested calls counted)


def test_a_batch_crosses_from_its_worker_as_one_block(tmp_path):
    """A worker hands its RawBatch over as one uint8 tensor (one shared-memory block, not one per
    image: 256 of those held the GPU pipeline under the plain loop on an H200); every payload
    arrives equal, in its shape, JPEG bytes and pixels alike; a loader with workers gives the same
    batch as one without."""
    import pickle

    from warmstart.data.batched import PackedPayloads
    from warmstart.data.imageset import ImageSet

    files = [_photo(tmp_path / "plain.jpg"), _photo(tmp_path / "small.png", fmt="PNG", size=(120, 90)),
             _photo(tmp_path / "portrait.jpg", orientation=6, size=(1600, 1200))]
    images = ImageSet(files, [0, 1, 0], ["a", "b"], files)
    view = TensorView.of(train_transform(data_config_for_lite0(), "standard"))
    raw = collate_raw([RawImageDataset(images, view, 5)[i] for i in range(3)])
    assert raw.kinds == ["jpeg", "pixels", "shaped"]
    state = raw.__getstate__()
    assert isinstance(state["data"], PackedPayloads)
    assert sum(isinstance(v, torch.Tensor) for v in vars(state["data"]).values()) == 1
    copy = pickle.loads(pickle.dumps(raw))
    assert [tuple(d.shape) for d in copy.data] == [tuple(d.shape) for d in raw.data]
    assert all(torch.equal(a, b) for a, b in zip(copy.data, raw.data))
    pipeline = DevicePipeline(view, CPU, channels_last=False)
    loader = torch.utils.data.DataLoader(RawImageDataset(images, view, 5), batch_size=3, num_workers=1,
                                         collate_fn=collate_raw)
    through_worker = pipeline(next(iter(loader)))
    assert torch.equal(through_worker.images, pipeline(raw).images)


def test_the_device_decodes_jpegs_in_groups_bounded_by_pixels(monkeypatch, odd_files):
    """A header may claim up to the pixel limit: nvJPEG gets groups of at most DEVICE_DECODE_PIXELS
    claimed pixels (one larger image alone), never the whole batch at full size."""
    from warmstart.data import batched

    names, images = odd_files
    item = images.items[names.index("plain")]
    payload = read(item)[1]
    calls = []

    def batch_decode(batch, device):
        calls.append(len(batch))
        return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)

    monkeypatch.setattr(batched, "DEVICE_DECODE_PIXELS", 3 * 120 * 90)
    pixels = [120 * 90] * 7 + [10 * 120 * 90, 120 * 90]
    decoded = decode_all(["jpeg"] * 9, [payload] * 9, CPU, batch_decode, pixels)
    assert calls == [3, 3, 1, 1, 1] and all(d.shape == (3, 90, 120) for d in decoded)
    assert batched.pixel_groups([0, 1, 2], [5, 5, 5], 10) == [[0, 1], [2]]


PREPARING = """
import itertools, threading, time
from warmstart.data.batched import ahead_of_time
from warmstart.stop import StopRequest, Stopped, check

def prepare(item):
    time.sleep(0.05)
    return item

for attempt in range(2):  # stopped by the first signal, then by the second
    with StopRequest():
        try:
            for item in ahead_of_time(itertools.count(), prepare, 2, threads=3):
                check()
                print("batch", item, flush=True)
        except Stopped as stop:
            print("stopped", stop.signum, "threads left", threading.active_count(), flush=True)
"""


@pytest.mark.slow  # a process (~4 s of imports)
def test_the_preparing_threads_shut_down_cleanly_on_sigint_and_sigterm(tmp_path):
    """Several preparing threads (issue 35), results in order; a stop request ends the loop at the
    next batch and every thread with it: SIGINT, then SIGTERM, each leaves no thread behind."""
    script = tmp_path / "preparing.py"
    script.write_text(PREPARING)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        seen = [process.stdout.readline() for _ in range(5)]
        assert seen == [f"batch {i}\n" for i in range(5)]  # in order though three threads prepare them
        process.send_signal(signum)
        line = process.stdout.readline()
        while line.startswith("batch"):  # those already on their way
            line = process.stdout.readline()
        assert line == f"stopped {int(signum)} threads left 1\n", line
    assert process.wait(timeout=10) == 0


def test_two_preparing_threads_on_a_many_core_gpu_host_one_elsewhere():
    from warmstart.data.batched import preparing_threads

    assert preparing_threads(torch.device("cpu"), 16) == 1
    assert preparing_threads(torch.device("cuda", 0), 16) == 2 and preparing_threads(torch.device("cuda", 0), 4) == 1
