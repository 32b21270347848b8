"""What a run records while it trains: TensorBoard event files and history.csv, side by side."""

from __future__ import annotations

import csv

import torch

from ..data.images import open_image

HISTORY_FIELDS = ["epoch", "train_loss", "train_top1", "val_top1", "lr", "images_per_sec", "seconds"]


class TrainingLog:
    """Scalars per step and per epoch (loss, top-1, learning rate, images/sec), and a grid of
    sample predictions of the last epoch, in `RUN/tensorboard/`; the epoch scalars also in
    `RUN/history.csv`."""

    def __init__(self, run_dir, samples=None, class_names: list[str] | None = None, transform=None,
                 append: bool = False, epochs: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir.tensorboard))
        self.csv_path = run_dir.history_csv
        if not (append and self.csv_path.is_file()):
            with self.csv_path.open("w", newline="") as handle:
                csv.writer(handle).writerow(HISTORY_FIELDS)
        self.class_names = class_names or []
        # a grid costs about half a second, more than an epoch of a head on cached features: one per
        # run, of the last epoch
        self.epochs = epochs
        self.samples = []  # (thumbnail, model input, true label)
        for item, label in samples or []:
            try:
                image = open_image(item)
            except Exception:
                continue
            self.samples.append((image.copy(), transform(image), label))

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, record: dict) -> None:
        e = record["epoch"]
        self.writer.add_scalar("train/loss", record["train_loss"], e)
        self.writer.add_scalar("train/top1", record["train_top1"], e)
        self.writer.add_scalar("train/lr", record["lr"], e)
        self.writer.add_scalar("train/images_per_sec", record["images_per_sec"], e)
        if "val_top1" in record:
            self.writer.add_scalar("val/top1", record["val_top1"], e)
        with self.csv_path.open("a", newline="") as handle:
            csv.writer(handle).writerow([record.get(k, "") for k in HISTORY_FIELDS])
        self.writer.flush()

    @torch.inference_mode()
    def predictions(self, epoch: int, forward) -> None:
        """A grid of sample validation images with their predicted and true classes (green where
        right, red where wrong), drawn with PIL: ~20 ms, where a matplotlib figure took ~0.2-0.4 s,
        more than a head's ten epochs on cached features."""
        if not self.samples or epoch != self.epochs:
            return
        import numpy as np

        probs = forward(torch.stack([s[1] for s in self.samples])).float().softmax(1).cpu()
        captions = []
        for (_, _, label), p in zip(self.samples, probs):
            predicted = int(p.argmax())
            captions.append((f"{self.class_names[predicted]} {float(p[predicted]):.0%}",
                             f"(true: {self.class_names[label]})", predicted == label))
        grid = prediction_grid([s[0] for s in self.samples], captions)
        self.writer.add_image("val/predictions", np.asarray(grid), epoch, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class QuietLog:
    """A log that writes nothing (library calls without a run directory, ranks other than 0)."""

    def step(self, *args) -> None:
        pass

    def epoch(self, record: dict) -> None:
        pass

    def predictions(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def prediction_grid(images: list, captions: list[tuple[str, str, bool]], cell: int = 180, columns: int = 4):
    """Thumbnails in a grid, each over two lines of caption, the first green (right) or red (wrong)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    text_height = 28
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, (first, second, right)) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        thumb = image.convert("RGB")
        thumb.thumbnail((cell - 8, cell - 8))
        grid.paste(thumb, (x + (cell - thumb.width) // 2, y + 4 + (cell - 8 - thumb.height) // 2))
        draw.text((x + 4, y + cell), first[:30], fill=(0, 128, 0) if right else (200, 0, 0), font=font)
        draw.text((x + 4, y + cell + 13), second[:30], fill=(60, 60, 60), font=font)
    return grid
