"""Where and how a run computes (device, precision, memory format) and how it talks (progress bars or log lines)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import UserError


class Reporter:
    """Progress bars, or plain log lines with --quiet."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent  # ranks other than 0 of a distributed run say nothing

    def info(self, message: str) -> None:
        if not self.silent:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        if not self.silent:
            tqdm.write(f"warning: {message}")

    def bar(self, total: int, desc: str, unit: str = "img"):
        return tqdm(total=total, desc=desc, unit=unit, disable=self.quiet, leave=False, dynamic_ncols=True)


def resolve_pipeline(choice: str, device: torch.device) -> str:
    """--pipeline as it runs on `device`: auto is the batched GPU pipeline on CUDA and the per-sample
    one elsewhere (on a CPU the workers' PIL path measured faster: BENCHMARKS.md §3)."""
    if choice == "gpu" and device.type != "cuda":
        raise UserError("--pipeline gpu needs a CUDA GPU and none is visible: use --pipeline cpu (or auto)")
    return "gpu" if choice == "gpu" or (choice == "auto" and device.type == "cuda") else "cpu"


@dataclass
class Runtime:
    """Where and how tensors are computed: device, precision, memory format, compilation."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True
    pipeline: str = "cpu"  # where images are decoded and augmented: "cpu" (workers) or "gpu" (batched)

    @classmethod
    def for_config(cls, config, local_rank: int = 0) -> "Runtime":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if config.precision == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a GPU: use --precision bf16 on the CPU")
        return cls(device, config.precision, config.channels_last, resolve_pipeline(config.pipeline, device))

    @property
    def batched_on(self) -> torch.device | None:
        """The device that decodes and augments batches (the batched pipeline), or None: workers do."""
        return self.device if self.pipeline == "gpu" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.ndim == 4 \
            else images

    def forward(self, module):
        """`module` as the run computes it: inputs moved and formatted, under the run's precision."""
        def run(images: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return module(self.inputs(images))

        return run

    def grad_scaler(self):
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
