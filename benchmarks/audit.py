"""Benchmark: `warmstart data audit` on real photos with planted problems. 5% of train's labels
flipped at random (seeded) and 10 val photos copied into train resized to 90% and re-encoded at
JPEG quality 75; then precision and recall of the flips in the top N of label_issues.csv (N = the
number flipped), the copies found as train↔val pairs, and the time. The unmodified sets are audited
too: what does it flag where nothing was planted?"""

from __future__ import annotations

import random
import time
from pathlib import Path

from PIL import Image

from warmstart import RunConfig
from warmstart.audit import audit

from .common import ROOT, SHARED, save

WORK = ROOT / ".bench-data" / "audit"
SETS = {"imagewoof-mini": "imagewoof-mini", "stanford-dogs-120-dev": "stanford-dogs-120-dev"}
FLIPPED, COPIES = 0.05, 10


def _planted(name: str, seed: int = 0) -> tuple[Path, set[str], set[str]]:
    """A linked copy of the set with flips and re-encoded copies: (root, flipped paths, copy paths)."""
    source, root = SHARED / name, WORK / f"{name}-planted"
    rng = random.Random(seed)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    photos = [(c, p) for c in classes for p in sorted((source / "train" / c).iterdir())]
    flips = set(rng.sample(range(len(photos)), round(FLIPPED * len(photos))))
    flipped, copies = set(), set()
    for i, (c, photo) in enumerate(photos):
        target = rng.choice([o for o in classes if o != c]) if i in flips else c
        link = root / "train" / target / photo.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(photo)
        if i in flips:
            flipped.add(str(link))
    val = [(c, p) for c in classes for p in sorted((source / "val" / c).iterdir())]
    for c, photo in val:
        link = root / "val" / c / photo.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(photo)
    for c, photo in rng.sample(val, COPIES):
        copy = root / "train" / c / f"copy-{photo.stem}.jpg"
        if not copy.exists():
            image = Image.open(photo).convert("RGB")
            image.resize((int(image.width * 0.9), int(image.height * 0.9))).save(copy, quality=75)
        copies.add(str(copy))
    return root, flipped, copies


def _audit(data: Path, out: Path, **settings) -> tuple[object, float]:
    start = time.perf_counter()
    result = audit(RunConfig.from_dict({"data": str(data), "out": str(out), "cache_dir": str(WORK / "cache"),
                                        "workers": 2, "quiet": True, **settings}))
    return result, time.perf_counter() - start


def _found(result, flipped: set[str]) -> float:
    return sum(r["path"] in flipped for r in result.label_issues[:len(flipped)]) / len(flipped)


def one(name: str) -> dict:
    root, flipped, copies = _planted(name)
    result, seconds = _audit(root, WORK / "out" / f"{name}-planted")
    found = _found(result, flipped)
    # the pretrained classifier's opinion (the head's start and pull) against a head from zero
    from_zero = _found(_audit(root, WORK / "out" / f"{name}-planted-zero", head_init="zero")[0], flipped)
    leaks = {d["path_a"] if d["split_a"] == "train" else d["path_b"] for d in result.leaks}
    clean, clean_seconds = _audit(SHARED / name, WORK / "out" / name)
    return {"set": name, "train_photos": sum(1 for _ in (root / "train").rglob("*.*")), "flipped": len(flipped),
            "precision_at_n": found, "recall_at_n": found, "precision_at_n_head_from_zero": from_zero,
            "issues_reported": len(result.label_issues),
            "flips_anywhere_in_issues": sum(r["path"] in flipped for r in result.label_issues),
            "copies": len(copies), "copies_found_as_leaks": len(copies & leaks),
            "duplicate_pairs": len(result.duplicates), "seconds": seconds,
            "clean": {"label_issues": len(clean.label_issues), "duplicates": len(clean.duplicates),
                      "leaks": len(clean.leaks), "outliers": len(clean.outliers), "seconds": clean_seconds,
                      "first_issues": clean.label_issues[:8], "first_outliers": clean.outliers[:5],
                      "first_duplicates": clean.duplicates[:5]}}


def run(quick: bool = False) -> dict:
    runs = [one(name) for name in (list(SETS)[:1] if quick else SETS)]
    result = {"benchmark": "data audit with planted label flips and re-encoded train/val copies", "quick": quick,
              "model": "efficientnet_lite0 at 224 px", "runs": runs}
    save("audit" + ("_quick" if quick else ""), result)
    return result
