"""Temperature scaling inside the model: logits / T, so that every way of using a run (predict,
serve, eval, an exported ONNX graph) gives the calibrated probabilities softmax(logits / T)."""

from __future__ import annotations

import torch
from torch import nn


class Temperature(nn.Module):
    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) / self.temperature
