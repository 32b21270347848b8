"""Benchmark 4b: folded BatchNorm for inference (models.fold, used by extraction, eval, predict and
the PyTorch service) against the network as trained: the frozen network's pooled features,
images/sec in fp32 channels_last at the threads this machine has, the median of interleaved rounds
(this VM's speed drifts between seconds; both sides see the same drift)."""

from __future__ import annotations

import numpy as np
import torch

from warmstart.compute.runtime import Runtime
from warmstart.models import create_model

from ..common import images_per_sec, save

NETWORKS = [("efficientnet_lite0", "bundled", 288), ("resnet50", "none", 224)]  # `best`'s Lite0 size
BATCH = 16


def one(name: str, weights: str, size: int, rounds: int, seconds: float) -> dict:
    runtime = Runtime(torch.device("cpu"), "fp32", True)
    model = runtime.prepare(create_model(name, 10, weights)[0].eval())
    folded = runtime.for_inference(model)
    images = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    forwards = {label: runtime.forward(lambda x, m=m: m.forward_head(m.forward_features(x), pre_logits=True))
                for label, m in (("as trained", model), ("folded", folded))}
    with torch.inference_mode():
        difference = float((forwards["folded"](images) - forwards["as trained"](images)).abs().max())
        seen = {label: [] for label in forwards}
        for _ in range(rounds):
            for label, forward in forwards.items():
                seen[label].append(images_per_sec(forward, images, seconds))
    rates = {label: float(np.median(r)) for label, r in seen.items()}
    return {"model": name, "input_size": size, "batch": BATCH, "images_per_sec": rates,
            "ratio": rates["folded"] / rates["as trained"], "max_feature_difference": difference,
            "batchnorms": sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()),
            "left": sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())}


def run(quick: bool = False) -> dict:
    rounds, seconds = (2, 1.0) if quick else (5, 2.0)
    result = {"benchmark": "folded BatchNorm for inference", "quick": quick, "rounds": rounds,
              "threads": torch.get_num_threads(), "runs": [one(*network, rounds, seconds) for network in NETWORKS]}
    save("fold" + ("_quick" if quick else ""), result)
    return result


if __name__ == "__main__":
    import sys

    run("--quick" in sys.argv)
