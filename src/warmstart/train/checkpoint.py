"""Checkpoints that survive crashes, and the state needed to continue a run exactly.

Everything is stored as tensors and plain containers, so checkpoints load with
torch.load(weights_only=True). Writes go to a temporary file that is flushed, fsynced and
renamed over `last.pt`; the checkpoint it replaces stays as `previous.pt`, which is used (with a
warning) when `last.pt` cannot be read.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..files import replacing
from ..stop import Stopped

FORMAT_VERSION = 1
LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"


class TrainingInterrupted(Stopped):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved first."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(signum, f"checkpoint {checkpoint}" if checkpoint else "")
        self.checkpoint = checkpoint


def rng_state() -> dict:
    """Python, numpy and torch generator states, as tensors and numbers (weights_only-safe)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in values.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, state: dict, best: bool = False) -> Path:
    """last.pt written whole (the one before it kept as previous.pt only once the new one is
    complete); a full disk is one line, with the checkpoints already there untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    last = folder / LAST
    with replacing(folder / "next.pt", "a checkpoint") as handle:
        torch.save({"format": FORMAT_VERSION, **state}, handle)
    if last.exists():
        os.replace(last, folder / PREVIOUS)
    os.replace(folder / "next.pt", last)
    if best:
        with replacing(folder / BEST, "the best checkpoint") as handle:
            torch.save({"format": FORMAT_VERSION, **state}, handle)
    return last


def load_checkpoint(folder: Path, warn=print) -> dict | None:
    """The newest readable checkpoint in `folder`: last.pt, else previous.pt with a warning."""
    for name in (LAST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {state.get('format')}")
            if name == PREVIOUS:
                warn(f"{folder / LAST} is missing or unreadable: resuming from {path} instead")
            return state
        except Exception as exc:
            warn(f"checkpoint {path} is unreadable ({exc.__class__.__name__}): trying an older one")
    return None
