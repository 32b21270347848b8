"""`warmstart data check`: scan a dataset and report classes, balance, sizes and every bad file."""

from __future__ import annotations

from dataclasses import replace

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .images import open_image
from .loaders import default_workers
from .sources import SourceOptions, load_source


@dataclass
class CheckReport:
    root: str
    splits: dict[str, dict[str, int]]  # split -> class name -> usable images
    images: int
    usable: int
    imbalance: float  # largest / smallest class in train (usable images)
    sizes: dict[str, dict[str, float]]
    problems: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_text(self) -> str:
        lines = [f"{self.root}: {self.usable} usable of {self.images} images, "
                 f"{len(next(iter(self.splits.values()), {}))} classes"]
        for split, counts in self.splits.items():
            values = list(counts.values())
            lines.append(f"  {split}: {sum(values)} images, per class min {min(values, default=0)} / "
                         f"median {int(np.median(values)) if values else 0} / max {max(values, default=0)}")
        lines.append(f"  imbalance (largest / smallest train class): {self.imbalance:.2f}")
        if self.sizes:
            w, h = self.sizes["width"], self.sizes["height"]
            lines.append(f"  image size: width {w['min']:.0f}/{w['median']:.0f}/{w['max']:.0f}, "
                         f"height {h['min']:.0f}/{h['median']:.0f}/{h['max']:.0f} (min/median/max px)")
        width = max((len(n) for c in self.splits.values() for n in c), default=5)
        lines.append("  images per class:")
        for name in next(iter(self.splits.values()), {}):
            lines.append(f"    {name:{width}}  " + "  ".join(f"{s} {c.get(name, 0)}" for s, c in self.splits.items()))
        lines.append(f"{len(self.problems)} problem file(s)" + (":" if self.problems else ""))
        lines.extend(f"  {path}: {reason}" for path, reason in self.problems)
        return "\n".join(lines)


def inspect_image(item) -> tuple[int, int, str | None]:
    """Fully decode one image: (width, height, None), or (0, 0, reason) when it cannot be used."""
    try:
        image = open_image(item)
        image.load()
        return image.width, image.height, None
    except Exception as exc:
        return 0, 0, f"{exc.__class__.__name__}: {exc}"


def check_dataset(data: str, workers: int | None = None, quiet: bool = False,
                  allow_outside_paths: bool = False, options: SourceOptions = SourceOptions()) -> CheckReport:
    splits = load_source(data, options=replace(options, drop_empty_classes=True, quiet=quiet,
                                               allow_outside_paths=allow_outside_paths or options.allow_outside_paths))
    problems: list[tuple[str, str]] = []
    for split in splits.values():
        problems.extend(split.ignored)
        problems.extend((f"{split.origin}/{name}", "class folder with no images")
                        for name in split.extra.get("dropped_classes", []))
    jobs = [(name, i) for name, split in splits.items() for i in range(len(split))]
    items = [splits[name].items[i] for name, i in jobs]
    workers = default_workers() if workers is None else workers
    with tqdm(total=len(items), desc="checking", unit="img", disable=quiet, leave=False) as bar:
        if workers > 1 and len(items) > 64:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = []
                for result in pool.map(inspect_image, items, chunksize=16):
                    results.append(result)
                    bar.update(1)
        else:
            results = []
            for item in items:
                results.append(inspect_image(item))
                bar.update(1)
    usable: dict[str, dict[str, int]] = {name: dict.fromkeys(split.class_names, 0) for name, split in splits.items()}
    widths, heights = [], []
    for (name, i), item, (w, h, reason) in zip(jobs, items, results):
        if reason:
            problems.append((str(item), reason))
            continue
        split = splits[name]
        usable[name][split.class_names[split.labels[i]]] += 1
        widths.append(w)
        heights.append(h)
    train_counts = [c for c in next(iter(usable.values()), {}).values()]
    imbalance = max(train_counts) / max(min(train_counts), 1) if train_counts else 0.0

    def stats(values):
        return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}

    sizes = {"width": stats(widths), "height": stats(heights)} if widths else {}
    return CheckReport(data, usable, len(items), len(widths), imbalance, sizes, sorted(problems))
