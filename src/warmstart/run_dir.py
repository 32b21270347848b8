"""The run directory: everything a run writes, and everything `predict` needs to load it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
# marks a folder as a warmstart run directory; locked while a run writes in it
LOCK_FILE = ".warmstart-run.lock"


def new_run_dir(out: str | None, model_name: str) -> Path:
    """`--out`, or runs/<timestamp>-<model>. Never overwrites a trained run, nor a folder of the
    user's: a non-empty folder is accepted only when it is an unfinished run of ours."""
    path = Path(out) if out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}"
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file: pass a directory path")
    if (path / MODEL_FILE).exists():
        raise UserError(f"{path} already holds a trained model: pass another --out (nothing was overwritten)")
    if path.is_dir() and not (path / LOCK_FILE).exists():
        other = next(iter(sorted(path.iterdir())), None)
        if other is not None:
            raise UserError(f"--out {path} is a folder with other files in it (e.g. {other.name}), not a warmstart "
                            f"run: pass a new or empty folder (nothing was written)")
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLock:
    """An exclusive lock on a run directory for the whole run: a second run with the same --out
    stops at once instead of mixing its files with the first one's. The OS releases it if the
    process dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not on a POSIX system: no lock, as before
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another warmstart run (pid {holder}): wait for it "
                            f"to finish or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock; the file stays as the run's mark
            self.fd = None


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
    meta = _read_meta(run_dir / META_FILE)
    try:
        model = build_model(meta["architecture"], len(meta["class_names"]))
        state = load_file(str(weights))
        model.load_state_dict(state)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise UserError(f"{weights} is damaged or does not match {META_FILE} ({reason}): restore the file from a "
                        f"backup, or train the run again") from None
    if meta.get("tta"):
        from .models.tta import FlipTTA

        model = FlipTTA(model)
    return LoadedRun(model.eval(), meta)


REQUIRED_META = ("architecture", "class_names", "class_ids", "data_config")


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return meta
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path} is missing or damaged ({exc.__class__.__name__}: {str(exc)[:120]}): restore it "
                        f"from a backup, or train the run again") from None
