"""Benchmark 11: how honest the probabilities are, before and after the temperature each run fits
on its validation logits, for heads started from the pretrained classifier (the default) and from
zero (as they were before it: far less confident). Train on imagewoof-mini train (1,000 photos), calibrate on its val
(400), and measure on val and on imagewoof-clean-val (200 photos no ImageNet-1k network trained
on): ECE (15 bins) and NLL before and after, and top-1 (a temperature cannot change it).

The head-only recipes run here; the whole-network ones need a GPU's epochs (BENCHMARKS.md §6).
Features are shared with benchmark 10 (.bench-data/), so only what is missing is extracted.

    python -m benchmarks.calibration
"""

from __future__ import annotations

import time

import warmstart

from .common import SHARED, save
from .pretrained_prior import WORK, link_tree

RECIPES = ("linear-probe", "feature-extractor", "best")


def run(quick: bool = False, head_inits: tuple[str, ...] = ("auto", "zero")) -> dict:
    woof = SHARED / "imagewoof-mini"
    data = link_tree("woof-10" if quick else "woof-all",
                      {"train": woof / "train", "val": woof / "val", "test": SHARED / "imagewoof-clean-val"},
                      10 if quick else None)
    runs = []
    for head_init, recipe in ((h, r) for h in head_inits for r in RECIPES):
        out = WORK / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-calibration-{recipe}-{head_init}"
        start = time.perf_counter()
        result = warmstart.train(warmstart.RunConfig.from_dict({
            "recipe": recipe, "data": str(data), "quiet": True, "workers": 2, "out": str(out),
            "cache_dir": str(WORK / "cache"), "head_init": head_init,
            # the head from zero as `best` had it until now: with label smoothing 0.1
            **({"label_smoothing": 0.1} if head_init == "zero" and recipe == "best" else {})}))
        m, c = result.metrics, result.metrics["calibration"]
        runs.append({"recipe": recipe, "head_init": head_init, "temperature": c["temperature"], "val_top1": m["top1"],
                     "val_ece_before": c["ece_before"], "val_ece_after": c["ece_after"],
                     "val_nll_before": c["nll_before"], "val_nll_after": c["nll_after"],
                     "clean_top1": m["test_top1"], "clean_ece_before": m["test_ece_uncalibrated"],
                     "clean_ece_after": m["test_ece"], "clean_nll_before": m["test_nll_uncalibrated"],
                     "clean_nll_after": m["test_nll"], "seconds": time.perf_counter() - start})
        print(runs[-1], flush=True)
    result = {"quick": quick, "train_images": 100 if quick else 1000, "runs": runs}
    save("calibration_quick" if quick else "calibration", result)
    return result



# (recipe, --calibration-fit): None is no recipe (warmstart's defaults: the head on images, val's T)
HELD_OUT = ((None, "auto"), ("best", "val"), ("best", "cross-fit"), ("feature-extractor", "val"),
            ("feature-extractor", "cross-fit"))


def held_out(seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Benchmark 11b (issue 32's held-out check): 10 breeds with 10 training photos each from
    imagewoof-mini (val carved from them: 20 photos), tested on imagewoof-clean-val (200 photos no
    ImageNet-1k network saw); the temperature fitted on val alone or cross-fitted on train + val;
    three seeds (a different carve each: 200 test photos make one ECE noisy). Then where cross-fitting
    stops mattering: `best` on all of imagewoof-mini (1,000 train, 400 val) both ways."""
    woof = SHARED / "imagewoof-mini"
    small = link_tree("woof-10-clean", {"train": woof / "train", "test": SHARED / "imagewoof-clean-val"}, 10)
    large = link_tree("woof-all", {"train": woof / "train", "val": woof / "val", "test": SHARED / "imagewoof-clean-val"},
                       None)
    plan = [(small, recipe, fit, seed) for recipe, fit in HELD_OUT for seed in seeds]
    plan += [(large, "best", fit, 0) for fit in ("val", "cross-fit")]
    runs = []
    for data, recipe, fit, seed in plan:
        out = WORK / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-held-out-{recipe or 'default'}-{fit}-{seed}"
        start = time.perf_counter()
        result = warmstart.train(warmstart.RunConfig.from_dict({
            **({"recipe": recipe} if recipe else {}), "data": str(data), "quiet": True, "workers": 2,
            "out": str(out), "cache_dir": str(WORK / "cache"), "seed": seed, "calibration_fit": fit}))
        m, c = result.metrics, result.metrics.get("calibration") or {}
        runs.append({"train_photos": 1000 if data == large else 100, "recipe": recipe or "default",
                     "fit": c.get("fitted_on"), "seed": seed, "temperature": c.get("temperature", 1.0),
                     "determined": c.get("determined"), "calibration_images": c.get("images"),
                     "test_top1": m["test_top1"], "test_ece_before": m.get("test_ece_uncalibrated", m["test_ece"]),
                     "test_ece_after": m["test_ece"], "seconds": time.perf_counter() - start})
        print(runs[-1], flush=True)
    result = {"runs": runs}
    save("calibration_held_out", result)
    return result


if __name__ == "__main__":
    import sys

    held_out() if "--held-out" in sys.argv else run("--quick" in sys.argv)
