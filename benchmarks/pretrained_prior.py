"""Benchmark 10: keeping what the pretrained network knows. For each set, backbone and number of
training photos per class, five warmstart runs on the same images and caches:

- the pretrained classifier alone (`--recipe best --epochs 0`: its rows for the matched classes);
- the probe from zero (`--recipe linear-probe --head-init zero`, what linear-probe did before);
- `best` as it was (`--recipe best --head-init zero --label-smoothing 0.1`);
- `best` with the pretrained start but without distillation (`--recipe best --head-teacher 0`);
- `best` now (`--recipe best`: the pretrained start, no label smoothing, --head-teacher 0.5).

Sets: imagewoof-mini (val: its own val/, photos ImageNet-1k trained on; test: imagewoof-clean-val,
photos no ImageNet-1k network trained on) and stanford-dogs-120-dev (val). Plus the digits, whose
classes ImageNet does not know (nothing may change). fp32 (bf16 is slow on CPUs without bf16
instructions); features are cached in .bench-data/, so a second run only fits.

    python -m benchmarks.pretrained_prior [--models efficientnet_lite0 efficientnet_lite2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import warmstart

from .common import RESULTS, ROOT, SHARED, save

WORK = ROOT / ".bench-data" / "prior"
METHODS = {
    "pretrained classifier alone": {"recipe": "best", "epochs": 0},
    "probe from zero": {"recipe": "linear-probe", "head_init": "zero"},
    "best today (head from zero)": {"recipe": "best", "head_init": "zero", "label_smoothing": 0.1},
    "best, pretrained start, no teacher": {"recipe": "best", "head_teacher": 0.0},
    "best, pretrained start": {"recipe": "best"},
}


def link_tree(name: str, splits: dict[str, Path], per_class: int | None) -> Path:
    """ROOT/<split>/<class>/<photo> links (the first `per_class` photos of each train class), at a
    stable path so that the feature cache finds the same images again."""
    root = WORK / name
    for split, source in splits.items():
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            photos = sorted(folder.iterdir())
            if split == "train" and per_class:
                photos = photos[:per_class]
            target = root / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for photo in photos:
                link = target / photo.name
                if not link.is_symlink():
                    link.symlink_to(photo.resolve())
    return root


def data_sets(quick: bool, only: tuple[str, ...] = (), sizes: tuple = (10, None)) -> list[tuple[str, Path, int | None]]:
    woof, sd = SHARED / "imagewoof-mini", SHARED / "stanford-dogs-120-dev"
    woof_splits = {"train": woof / "train", "val": woof / "val", "test": SHARED / "imagewoof-clean-val"}
    sizes = (10,) if quick else sizes
    sets = [("imagewoof-mini", link_tree(f"woof-{n or 'all'}", woof_splits, n), n) for n in sizes]
    if not quick:
        sets += [("stanford-dogs-120-dev", link_tree(f"sd120-{n or 'all'}", {"train": sd / "train", "val": sd / "val"},
                                                      n), n) for n in sizes]
    return [s for s in sets if not only or s[0] in only]


def one_run(settings: dict, model: str, data: Path | str, name: str) -> dict:
    out = WORK / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    settings = {**settings, "model": model, "data": str(data), "quiet": True, "workers": 2, "out": str(out),
                "cache_dir": str(WORK / "cache")}
    start = time.perf_counter()
    result = warmstart.train(warmstart.RunConfig.from_dict(settings))
    m = result.metrics
    return {"model": model, "top1": m["top1"], "test_top1": m.get("test_top1"),
            "seconds": time.perf_counter() - start, "head_start": m["head_start"]}


def run(quick: bool = False, models: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite2"),
        sets: tuple[str, ...] = (), digits: bool = True, methods: tuple[str, ...] = tuple(METHODS),
        sizes: tuple = (10, None)) -> dict:
    previous = RESULTS / "pretrained_prior.json"
    done = json.loads(previous.read_text())["runs"] if previous.is_file() and not quick else []
    key = lambda r: (r["set"], r["per_class"], r["model"], r["method"])  # noqa: E731
    runs = {key(r): r for r in done}
    for model in models:
        for name, data, per_class in data_sets(quick, sets, sizes):
            for method in methods:
                entry = {"set": name, "per_class": per_class, "model": model, "method": method}
                if key(entry) in runs:
                    continue
                label = f"{name}-{per_class or 'all'}-{model}-{method.split()[0]}"
                runs[key(entry)] = {**entry, **one_run(METHODS[method], model, data, label)}
                r = runs[key(entry)]
                print(f"{name} {per_class or 'all'}/class {model} {method}: val {r['top1']:.4f} "
                      f"test {r['test_top1']} in {r['seconds']:.0f}s", flush=True)
                _save_merged(quick, runs)
    # the digits: no class is an ImageNet class, so --head-init auto (the default) must change nothing
    digits = [{"head_init": h, **one_run({"recipe": "linear-probe", "head_init": h}, "efficientnet_lite0",
                                         "sklearn-digits", f"digits-{h}")} for h in ("zero", "auto")] if digits \
        else None
    return _save_merged(quick, runs, digits)


def _save_merged(quick: bool, runs: dict, digits: list | None = None) -> dict:
    """Save this process's runs over what the results file holds (several backbones may be measured
    by processes running side by side)."""
    name = "pretrained_prior_quick" if quick else "pretrained_prior"
    path = RESULTS / f"{name}.json"
    held = json.loads(path.read_text()) if path.is_file() else {}
    merged = {(r["set"], r["per_class"], r["model"], r["method"]): r for r in held.get("runs", [])}
    merged.update(runs)
    result = {"quick": quick, "runs": list(merged.values()), "digits": digits or held.get("digits", [])}
    save(name, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--sets", nargs="+", default=[], help="imagewoof-mini, stanford-dogs-120-dev (default: both)")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sizes", nargs="+", default=["10", "all"], help="photos per class: 10, all")
    args = parser.parse_args()
    run(args.quick, tuple(args.models), tuple(args.sets), not args.no_digits, tuple(args.methods),
        tuple(None if s == "all" else int(s) for s in args.sizes))
