"""The report's figures (matplotlib, Agg backend), each written as a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def curves(history: list[dict], path: Path) -> tuple[Path, str]:
    """The figure that fits the path that trained: an L-BFGS head's convergence per evaluation
    (its "epochs" are steps of up to 20 iterations, flat after the first), else the loss and top-1
    per epoch, with the learning rate only where it changed. Returns the PNG and what it shows."""
    if any(h.get("objective") for h in history):
        return _convergence(history, path), "L-BFGS convergence per evaluation"
    epochs = [h["epoch"] for h in history]
    rates = [h["lr"] for h in history]
    varies = max(rates) > min(rates) * (1 + 1e-9)
    figure, axes = plt.subplots(1, 3 if varies else 2, figsize=(13 if varies else 9, 3.6))
    loss_ax, acc_ax = axes[0], axes[1]
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o")
    loss_ax.set(title="training loss", xlabel="epoch")
    acc_ax.plot(epochs, [h["train_top1"] for h in history], marker="o", label="train")
    if any("val_top1" in h for h in history):
        acc_ax.plot([h["epoch"] for h in history if "val_top1" in h],
                    [h["val_top1"] for h in history if "val_top1" in h], marker="o", label="val")
    acc_ax.set(title="top-1 accuracy", xlabel="epoch")
    acc_ax.legend()
    if varies:
        axes[2].plot(epochs, rates, marker="o")
        axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(figure, path), "loss and top-1 per epoch" + (" and the learning rate" if varies else "")


def _convergence(history: list[dict], path: Path) -> Path:
    values = np.array([v for h in history for v in h.get("objective", [])])
    figure, ax = plt.subplots(figsize=(7, 3.6))
    above = np.maximum(values - values.min(), 1e-12)
    ax.semilogy(np.arange(1, len(values) + 1), above, marker=".")
    ax.set(title=f"L-BFGS: objective above its final value ({values.min():.4f})", xlabel="evaluation",
           ylabel="objective - final")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def per_class(names: list[str], accuracy: list[float], path: Path) -> Path:
    order = np.argsort(accuracy)
    height = max(3.0, 0.18 * len(names) + 1)
    figure, ax = plt.subplots(figsize=(7, height))
    ax.barh(range(len(names)), [accuracy[i] for i in order], color="#4c72b0")
    ax.set_yticks(range(len(names)), [names[i] for i in order], fontsize=7 if len(names) > 40 else 9)
    ax.set(xlim=(0, 1), xlabel="accuracy", title="per-class accuracy (worst first)")
    ax.invert_yaxis()
    return _save(figure, path)


def confusion_order(confusion: np.ndarray) -> np.ndarray:
    """Classes ordered so that those confused with each other sit together (hierarchical
    clustering of the symmetrised, row-normalised confusion)."""
    n = len(confusion)
    if n < 3:
        return np.arange(n)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    similarity = (rates + rates.T) / 2
    np.fill_diagonal(similarity, 0)
    distance = 1.0 - similarity / max(similarity.max(), 1e-12)
    np.fill_diagonal(distance, 0)
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


def confusion_matrix(names: list[str], confusion: np.ndarray, path: Path) -> Path:
    order = confusion_order(confusion)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = min(max(5.0, 0.12 * len(names) + 3), 22)
    figure, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates[np.ix_(order, order)], cmap="Blues", vmin=0, vmax=1)
    fontsize = 9 if len(names) <= 20 else 5 if len(names) <= 60 else 4
    ax.set_xticks(range(len(names)), [names[i] for i in order], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(names)), [names[i] for i in order], fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalised, similar classes together)")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(figure, path)


def reliability_diagram(calib: dict, path: Path, before: dict | None = None) -> Path:
    """Accuracy against confidence per bin (calibration.reliability), and the uncalibrated
    probabilities' bins beside them where the run fitted a temperature."""
    figure, ax = plt.subplots(figsize=(4.8, 4.5))
    width = 0.9 / 15  # the bins of calibration.reliability
    centers = [(b["low"] + b["high"]) / 2 for b in calib["bins"]]
    ax.bar(centers, [b["accuracy"] for b in calib["bins"]], width=width, color="#4c72b0", alpha=0.8,
           label=f"accuracy{' (calibrated)' if before else ''}")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot([b["confidence"] for b in calib["bins"]], [b["accuracy"] for b in calib["bins"]], "o", color="#dd8452",
            label="mean confidence" + (f" (calibrated, ECE {calib['ece']:.3f})" if before else ""))
    title = f"reliability (ECE {calib['ece']:.3f})"
    if before:
        ax.plot([b["confidence"] for b in before["bins"]], [b["accuracy"] for b in before["bins"]], "x-",
                color="#c44e52", label=f"before calibration (ECE {before['ece']:.3f})")
        title = f"reliability: ECE {before['ece']:.3f} -> {calib['ece']:.3f}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=7)
    return _save(figure, path)
