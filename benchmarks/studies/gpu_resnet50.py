"""The GPU check (run when a GPU is lent): ResNet50 full fine-tuning on synthetic 224x224 data,
fp32 against bf16 + channels_last (+ torch.compile), and feature-extraction images/sec.
Compared in the same run with the original demo's 770 img/s on 4x GTX 1080 Ti.

    python -m benchmarks.studies.gpu_resnet50 [--steps 30] [--batch 128]

Writes benchmarks/results/gpu_resnet50.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from ..common import save

DEMO_IMAGES_PER_SEC = 770  # ResNet50 feature extractor, 4x GTX 1080 Ti, TensorFlow 1


def _train_rate(model, batch, steps, precision, channels_last, compile_):
    device = torch.device("cuda")
    model = model.to(device).train()
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 120, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_ else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5 if not compile_ else 10):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


@torch.inference_mode()
def _extract_rate(model, batch, steps):
    device = torch.device("cuda")
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            model.forward_head(model.forward_features(x), pre_logits=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model.forward_head(model.forward_features(x), pre_logits=True)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no GPU here: this benchmark is for a lent GPU machine")
    results = {}
    for name, options in {"fp32 NCHW": ("fp32", False, False), "bf16 channels_last": ("bf16", True, False),
                          "bf16 channels_last compile": ("bf16", True, True)}.items():
        torch.manual_seed(0)
        results[name] = _train_rate(timm.create_model("resnet50", num_classes=120), args.batch, args.steps, *options)
        print(f"fine-tune {name}: {results[name]:.0f} img/s", flush=True)
    extract = _extract_rate(timm.create_model("resnet50", num_classes=120), 256, args.steps)
    print(f"feature extraction bf16 channels_last: {extract:.0f} img/s")
    save("gpu_resnet50", {"benchmark": "ResNet50 on synthetic 224x224, one GPU", "batch": args.batch,
                          "fine_tune_images_per_sec": results, "extraction_images_per_sec": extract,
                          "demo_4x1080ti_images_per_sec": DEMO_IMAGES_PER_SEC,
                          "ratio_vs_demo": {k: v / DEMO_IMAGES_PER_SEC for k, v in results.items()}})


if __name__ == "__main__":
    main()
