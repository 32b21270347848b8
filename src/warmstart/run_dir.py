"""The run directory: everything a run writes, and everything `predict` needs to load it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"


def new_run_dir(out: str | None, model_name: str) -> Path:
    """`--out`, or runs/<timestamp>-<model>. Never overwrites a trained run."""
    path = Path(out) if out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}"
    if (path / MODEL_FILE).exists():
        raise UserError(f"{path} already holds a trained model: pass another --out (nothing was overwritten)")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file: pass a directory path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_model(run_dir: Path, model: torch.nn.Module, meta: dict) -> None:
    """Weights as safetensors, with the metadata embedded and beside it as JSON."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run_dir / MODEL_FILE), metadata={"warmstart": json.dumps(meta)})
    (run_dir / META_FILE).write_text(json.dumps(meta, indent=2))


@dataclass
class LoadedRun:
    model: torch.nn.Module
    meta: dict

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def class_ids(self) -> list[str]:
        return self.meta["class_ids"]

    @property
    def data_config(self) -> dict:
        config = dict(self.meta["data_config"])
        config["input_size"] = tuple(config["input_size"])
        config["mean"], config["std"] = tuple(config["mean"]), tuple(config["std"])
        return config


def load_run(run_dir: str | Path) -> LoadedRun:
    """The trained model of a run directory, in eval mode, from the run alone."""
    from .models.create import build_model

    run_dir = Path(run_dir)
    weights = run_dir / MODEL_FILE
    if not weights.is_file():
        raise UserError(f"{run_dir} is not a trained run (no {MODEL_FILE}): pass a directory written by 'warmstart train'")
    meta = json.loads((run_dir / META_FILE).read_text())
    model = build_model(meta["architecture"], len(meta["class_names"]))
    model.load_state_dict(load_file(str(weights)))
    if meta.get("tta"):
        from .models.tta import FlipTTA

        model = FlipTTA(model)
    return LoadedRun(model.eval(), meta)
