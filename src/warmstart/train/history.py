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
        """A grid of sample validation images with their true and predicted classes."""
        if not self.samples or epoch != self.epochs:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        probs = forward(torch.stack([s[1] for s in self.samples])).float().softmax(1).cpu()
        cols = min(4, len(self.samples))
        rows = (len(self.samples) + cols - 1) // cols
        figure, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (thumb, _, label), p in zip(axes.flat, self.samples, probs):
            predicted = int(p.argmax())
            ax.imshow(thumb)
            ax.set_title(f"{self.class_names[predicted]} {float(p[predicted]):.0%}\n(true: {self.class_names[label]})",
                         fontsize=8, color="green" if predicted == label else "red")
        figure.tight_layout()
        self.writer.add_figure("val/predictions", figure, epoch)
        plt.close(figure)

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
