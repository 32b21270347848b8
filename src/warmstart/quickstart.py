"""The offline quickstart: the bundled EfficientNet-Lite0 as a feature extractor on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .config import RunConfig
from .data.sources import BUILTIN_DIGITS, resolve_splits
from .run_dir import RunDir
from .train.run import RunResult, train


def quickstart_config(out: str | None = None, quiet: bool = False) -> RunConfig:
    return RunConfig(
        data=BUILTIN_DIGITS,
        val_fraction=0.2,
        model="efficientnet_lite0",
        weights="bundled",
        strategy="feature-extractor",
        input_size=96,  # 8x8 digits gain nothing from 224 px; extraction is 5x faster
        crop_pct=1.0,  # keep the whole digit
        augment="none",
        epochs=30,
        batch_size=64,
        lr=0.01,
        label_smoothing=0.1,
        out=out,
        quiet=quiet,
    )


def write_samples(run_dir: Path, seed: int = 0) -> list[Path]:
    """One held-out digit per class as PNG files in the run directory, to try `warmstart predict` on."""
    config = quickstart_config()
    held_out = resolve_splits(BUILTIN_DIGITS, config.val_fraction, seed)["val"]
    folder = RunDir(run_dir).samples
    folder.mkdir(exist_ok=True)
    written, seen = [], set()
    for item, label in zip(held_out.items, held_out.labels):
        if label in seen:
            continue
        seen.add(label)
        path = folder / f"digit_{label}.png"
        Image.fromarray(item).save(path)
        written.append(path)
    return sorted(written)


def quickstart(out: str | None = None, quiet: bool = False) -> RunResult:

    result = train(quickstart_config(out, quiet))
    write_samples(result.run_dir)
    return result
