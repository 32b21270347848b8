"""The run directory: every file a run writes (`RunDir` knows their names), its lock, and loading
a trained run back for `predict`, `eval`, `export` and `serve`."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, excerpt
from .files import write_atomically

# torch and safetensors are imported where weights are read or written: the run directory's
# names are needed where only onnxruntime is installed (ONNX predict, serve)

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
# marks a folder as a warmstart run directory; locked while a run writes in it
LOCK_FILE = ".warmstart-run.lock"


class RunDir:
    """A run directory and the names of everything in it."""

    def __init__(self, path: "str | Path | RunDir"):
        self.path = Path(getattr(path, "path", path))

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config = property(lambda self: self.path / "config.yaml")  # the resolved run config
    restore_report = property(lambda self: self.path / "restore_report.json")
    model = property(lambda self: self.path / MODEL_FILE)  # trained weights, metadata embedded
    meta = property(lambda self: self.path / META_FILE)  # what predict needs besides the weights
    metrics = property(lambda self: self.path / "metrics.json")
    history = property(lambda self: self.path / "history.json")
    history_csv = property(lambda self: self.path / "history.csv")
    skipped = property(lambda self: self.path / "skipped.txt")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tensorboard")
    cache = property(lambda self: self.path / "cache")  # the default feature/image cache
    lock = property(lambda self: self.path / LOCK_FILE)
    report = property(lambda self: self.path / "report.html")
    report_figures = property(lambda self: self.path / "report")
    samples = property(lambda self: self.path / "samples")

    def evaluation(self, split: str = "val") -> tuple[Path, Path, Path]:
        """An evaluation's summary, confusion matrix and per-class accuracy files: one set per split
        (`eval*` for val, the run's own evaluation; `eval_test*`, `eval_train*` for the others)."""
        name = "eval" if split == "val" else f"eval_{split}"
        return (self.path / f"{name}.json", self.path / f"{name}_confusion_matrix.csv",
                self.path / f"{name}_per_class.csv")

    def lr_find(self, suffix: str) -> Path:
        return self.path / f"lr_find.{suffix}"

    @property
    def trained(self) -> bool:
        return self.model.exists()


def new_run_dir(out: str | None, model_name: str) -> RunDir:
    """`--out`, or runs/<timestamp>-<model>. Never overwrites a trained run, nor a folder of the
    user's: a non-empty folder is accepted only when it is an unfinished run of ours."""
    run = RunDir(Path(out) if out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}")
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--out {run} is a file: pass a directory path")
    if run.trained:
        raise UserError(f"{run} already holds a trained model: pass another --out (nothing was overwritten)")
    if run.path.is_dir() and not run.lock.exists():
        other = next(iter(sorted(run.path.iterdir())), None)
        if other is not None:
            raise UserError(f"--out {run} is a folder with other files in it (e.g. {other.name}), not a warmstart "
                            f"run: pass a new or empty folder (nothing was written)")
    if run.lock.exists():
        with RunLock(run):  # a run in progress there is named before anything else
            pass
        saved = sorted(run.checkpoints.glob("*.pt")) if run.checkpoints.is_dir() else []
        if saved:
            raise UserError(f"--out {run} holds an unfinished run with a checkpoint ({saved[-1].name}): continue it "
                            f"with 'warmstart train --resume {run}', or pass another --out (nothing was deleted)")
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {run}: cannot create that folder ({exc.strerror}): pass a folder you can write "
                        f"to") from None
    return run


_HELD_LOCKS: set[int] = set()  # this process's run-lock descriptors


def _drop_locks_in_child() -> None:
    """A forked child (a loader worker) lets go of its parent's run locks: a flock belongs to every
    process holding the descriptor, so orphaned workers of a killed run would keep it."""
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


class RunLock:
    """An exclusive lock on a run directory for the whole run: a second run with the same --out
    stops at once instead of mixing its files with the first one's. It dies with the process that
    took it (its forked workers do not inherit it)."""

    def __init__(self, run_dir: str | Path | RunDir):
        self.path = RunDir(run_dir).lock
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
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another warmstart run{_alive(holder)}: wait for it "
                            f"to finish or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        _HELD_LOCKS.add(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _HELD_LOCKS.discard(self.fd)
            os.close(self.fd)  # closing releases the lock; the file stays as the run's mark
            self.fd = None


def _alive(pid: str) -> str:
    """' (pid N)' when that process is alive; a dead one is never named."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return ""
    except PermissionError:
        pass  # alive, another user's
    return f" (pid {pid})"


def start_afresh(run: RunDir) -> None:
    """A new run in the folder of an unfinished one (its lock held): what the dead run wrote goes,
    so that history, events and reports are the new run's own; its cache stays (keyed by content).
    new_run_dir refused the folder if it held a checkpoint."""
    import shutil

    for entry in run.path.iterdir():
        if entry.name in (LOCK_FILE, run.cache.name):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def save_model(run_dir: str | Path | RunDir, model, meta: dict) -> None:
    """Weights as safetensors, with the metadata embedded and beside it as JSON; each file whole or
    not at all (a full disk is one line, and the files there before stay)."""
    from safetensors.torch import save

    run = RunDir(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(run.model, save(state, metadata={"warmstart": json.dumps(meta)}), "the model")
    write_atomically(run.meta, json.dumps(meta, indent=2), "the model's metadata")


@dataclass
class LoadedRun:
    model: object  # what answers: the network, with flip TTA and the temperature where the run has them
    meta: dict
    network: object = None  # the trained network alone (its weights, as model.safetensors holds them)

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

    def export_metadata(self) -> dict:
        """Everything a deployment needs besides the weights: classes and preprocessing."""
        config = self.data_config
        return {
            "architecture": self.meta["architecture"],
            "model": self.meta["model"],
            "class_names": self.class_names,
            "class_ids": self.class_ids,
            "input_size": list(config["input_size"]),
            "mean": list(config["mean"]),
            "std": list(config["std"]),
            "interpolation": config["interpolation"],
            "crop_pct": config["crop_pct"],
            "crop_mode": config.get("crop_mode", "center"),
            # the graph divides the logits by it: its probabilities are the calibrated ones
            "temperature": self.meta.get("temperature"),
            "calibrated": bool(self.meta.get("temperature")),
            "tta": bool(self.meta.get("tta")),  # the graph averages the image and its mirror image
            "warmstart_version": self.meta.get("warmstart_version"),
        }


def load_run(run_dir: str | Path | RunDir) -> LoadedRun:
    """The trained model of a run directory, in eval mode, from the run alone."""
    from safetensors.torch import load_file

    from .models.create import build_model

    run = RunDir(run_dir)
    weights = run.model
    if not weights.is_file():
        raise UserError(f"{run} is not a trained run (no {MODEL_FILE}): pass a directory written by 'warmstart train'")
    meta = _read_meta(run.meta)
    try:
        model = build_model(meta["architecture"], len(meta["class_names"]))
        state = load_file(str(weights))
        model.load_state_dict(state)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise UserError(f"{weights} is damaged or does not match {META_FILE} ({reason}): restore the file from a "
                        f"backup, or train the run again") from None
    from .models.outputs import as_used

    network = model.eval()  # calibrated probabilities: softmax(logits / T)
    return LoadedRun(as_used(network, meta.get("tta"), meta.get("temperature")).eval(), meta, network)


REQUIRED_META = ("architecture", "class_names", "class_ids", "data_config")


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path} is missing or damaged ({exc.__class__.__name__}: {str(exc)[:120]}): restore it "
                        f"from a backup, or train the run again") from None
    problem = meta_problem(meta)
    if problem:
        raise UserError(f"{path}: {problem}: restore the file from a backup, or train the run again")
    return meta




def _number(value) -> bool:
    """A real, finite number (JSON's true/false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def meta_problem(meta: dict) -> str | None:
    """What is wrong with a model.json's fields (None: nothing): every number a run is used with
    finite and in range, every list of the right type and length."""
    from .calibration import FITTED_ON, TEMPERATURE_BOUNDS

    low, high = TEMPERATURE_BOUNDS
    temperature = meta.get("temperature")
    if temperature is not None and not (_number(temperature) and low <= temperature <= high):
        return (f"field 'temperature' is {excerpt(temperature)}; it must be a number from {low:.4g} to {high:.4g} "
                f"(or null: not calibrated)")
    fitted_on = meta.get("temperature_fitted_on")
    if fitted_on is not None and fitted_on not in FITTED_ON:
        return f"field 'temperature_fitted_on' is {excerpt(fitted_on)}; it must be one of {', '.join(FITTED_ON)} (or null)"
    names, ids = meta["class_names"], meta["class_ids"]
    for field, values in (("class_names", names), ("class_ids", ids)):
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            return f"field '{field}' is {excerpt(values)}; it must be a non-empty list of strings"
    if len(names) != len(ids):
        return f"fields 'class_names' and 'class_ids' differ in length ({len(names)} and {len(ids)})"
    if not isinstance(meta["architecture"], str):
        return f"field 'architecture' is {excerpt(meta['architecture'])}; it must be a timm name"
    if "tta" in meta and not isinstance(meta["tta"], bool):
        return f"field 'tta' is {excerpt(meta['tta'])}; it must be true or false"
    return _data_config_problem(meta["data_config"])


def _data_config_problem(config) -> str | None:
    if not isinstance(config, dict):
        return f"field 'data_config' is {excerpt(config)}; it must be an object"
    size = config.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and
                                                             0 < v <= 4096 for v in size)):
        return f"field 'data_config.input_size' is {excerpt(size)}; it must be [channels, height, width], each 1-4096"
    for field in ("mean", "std"):
        values = config.get(field)
        if not (isinstance(values, list) and len(values) == size[0] and all(_number(v) for v in values)
                and (field == "mean" or all(v > 0 for v in values))):
            return (f"field 'data_config.{field}' is {excerpt(values)}; it must be {size[0]} finite numbers"
                    + (", each above 0" if field == "std" else ""))
    crop = config.get("crop_pct")
    if crop is not None and not (_number(crop) and 0 < crop <= 1):
        return f"field 'data_config.crop_pct' is {excerpt(crop)}; it must be a number in (0, 1]"
    if not isinstance(config.get("interpolation", "bicubic"), str):
        return f"field 'data_config.interpolation' is {excerpt(config.get('interpolation'))}; it must be a name"
    return None
