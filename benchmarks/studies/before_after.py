"""No regression from a refactor, measured in one run: the same three workloads through the public
API (`warmstart.train`, `warmstart.evaluate`), on the code of a base commit and on this tree,
interleaved A B A B so that a drift of the machine falls on both. fp32 only.

    python -m benchmarks.studies.before_after --base b5b08e7 [--repeats 2]

Workloads (imagewoof-mini, the quick subsets of benchmarks 1-3): the feature-extractor recipe
(200 train / 100 val, extraction + 10 epochs on cached features + evaluation, wall time), one
epoch of full fine-tuning on images (160 photos, the epoch's images/sec), and evaluating the
first run on its val split (images/sec of the evaluation loader and forward)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ..common import ROOT, SHARED, save

WORKLOAD = r'''
import json, sys, time, tempfile, shutil
from pathlib import Path
import torch
torch.set_num_threads(2)
import warmstart
from warmstart.data.sources import resolve_splits
shared, work = Path(sys.argv[1]), Path(tempfile.mkdtemp(prefix="ws-ab-"))
splits = resolve_splits(str(shared / "imagewoof-mini"), 0.2, 0)
for split, per_class in (("train", 20), ("val", 10)):
    images = splits[split]
    seen = {}
    for item, label in zip(images.items, images.labels):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            target = work / "data" / split / images.class_ids[label] / Path(item).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(item)
base = {"data": str(work / "data"), "workers": 2, "quiet": True, "seed": 0}
start = time.perf_counter()
fe = warmstart.train(warmstart.RunConfig.from_dict({**base, "augment": "none", "epochs": 10, "out": str(work / "fe")}))
fe_seconds = time.perf_counter() - start
ft = warmstart.train(warmstart.RunConfig.from_dict({**base, "strategy": "fine-tune", "epochs": 1, "lr": 1e-3,
                                                    "out": str(work / "ft")}))
rate = next(v for k, v in ft.history[-1].items() if "images_per_sec" in k)
ev = warmstart.evaluate(fe.run_dir, split="val")
print(json.dumps({"feature_extractor_seconds": fe_seconds, "feature_extractor_top1": fe.metrics["top1"],
                  "fine_tune_images_per_sec": rate, "eval_images_per_sec": ev.images_per_sec}))
shutil.rmtree(work, ignore_errors=True)
'''


def _measure(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, str(SHARED)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(base: str, repeats: int = 2) -> dict:
    with tempfile.TemporaryDirectory(prefix="ws-base-") as tmp:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", tmp, base], check=True,
                       capture_output=True)
        try:
            sources = {"before": Path(tmp) / "src", "after": ROOT / "src"}
            measured = {"before": [], "after": []}
            for _ in range(repeats):
                for name, src in sources.items():
                    measured[name].append(_measure(src))
                    print(name, measured[name][-1], flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tmp], capture_output=True)
    medians = {name: {k: statistics.median(m[k] for m in runs) for k in runs[0]} for name, runs in measured.items()}
    result = {"benchmark": "before/after a refactor, same workloads, interleaved", "base": base, "repeats": repeats,
              "measured": measured, "medians": medians,
              "ratios": {k: medians["after"][k] / medians["before"][k] for k in medians["after"]}}
    save("before_after", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(run(args.base, args.repeats), indent=2))
