"""`warmstart runs` and `warmstart compare`: what was trained, and how runs differ."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import UserError, excerpt
from ..files import load_yaml
from ..run_dir import RunDir


def _load(path: Path) -> dict:
    """The run's metrics and config; a run whose files are damaged is marked so (its `damaged`
    says what), never the end of the listing."""
    run = RunDir(path)
    try:
        metrics = json.loads(run.metrics.read_text())
        config = (load_yaml(run.config.read_text(), run.config) if run.config.is_file() else {}) or {}
        for name, value in (("metrics.json", metrics), ("config.yaml", config)):
            if not isinstance(value, dict):
                raise ValueError(f"{name} is not a mapping")
        problem = metrics_problem(metrics)
        if problem:
            raise ValueError(f"metrics.json: {problem}")
    except (OSError, ValueError, UserError, yaml.YAMLError) as exc:
        return {"run": str(path), "metrics": {}, "config": {}, "damaged": f"{exc.__class__.__name__}: "
                f"{excerpt(str(exc), 60)}"}
    return {"run": str(path), "metrics": metrics, "config": config}


TEXT_FIELDS = ("model", "architecture", "recipe", "training_path", "strategy")
NUMBER_FIELDS = ("top1", "top5", "test_top1", "test_images", "train_images", "wall_seconds", "epochs",
                 "train_images_per_sec", "feature_extraction_images_per_sec", "head_training_images_per_sec",
                 "eval_images_per_sec")
MAPPING_FIELDS = ("calibration", "head_start")


def metrics_problem(metrics: dict) -> str | None:
    """A field the listing or the report shows with the wrong type (a hand-edited or foreign
    metrics.json)."""
    for name in MAPPING_FIELDS:
        if metrics.get(name) is not None and not isinstance(metrics[name], dict):
            return f"'{name}' is {excerpt(metrics[name], 30)}, not an object"
    for name in TEXT_FIELDS:
        if metrics.get(name) is not None and not isinstance(metrics[name], str):
            return f"'{name}' is {excerpt(metrics[name], 30)}, not text"
    for name in NUMBER_FIELDS:
        value = metrics.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"'{name}' is {excerpt(value, 30)}, not a number"
    return None


def list_runs(directory: str | Path = "runs") -> list[dict]:
    """Every run below `directory` (a folder with metrics.json), newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder of runs: pass the folder your runs are in (default runs/)")
    found = sorted({p.parent for p in directory.rglob(RunDir(".").metrics.name)}, key=lambda p: p.stat().st_mtime,
                   reverse=True)
    return [_load(p) for p in found]


def _score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def runs_table(runs: list[dict]) -> str:
    """One line a run: its recipe, how it trained (the strategy, and the path it took), val and
    test top-1 ("-" where the run has no such split)."""
    lines = [f"{'run':32} {'model':18} {'recipe':17} {'trained':28} {'epochs':>6} {'val top-1':>9} "
             f"{'test top-1':>10} {'time':>8}"]
    for r in runs:
        if r.get("damaged"):
            lines.append(f"{Path(r['run']).name[:32]:32} damaged, not listed: {r['damaged']}")
            continue
        m = r["metrics"]
        path = m.get("training_path") or "images"  # runs from before the path was recorded
        trained = path if path.startswith("cached") else f"{m.get('strategy', '?')} on images"
        lines.append(f"{Path(r['run']).name[:32]:32} {m.get('model', '?')[:18]:18} {m.get('recipe') or '-':17} "
                     f"{trained[:28]:28} {m.get('epochs', '?'):>6} {_score(m.get('top1')):>9} "
                     f"{_score(m.get('test_top1')):>10} {m.get('wall_seconds', 0):>7.1f}s")
    return "\n".join(lines)


COMPARED_METRICS = ["top1", "top5", "test_top1", "ece", "epochs", "train_images_per_sec",
                    "feature_extraction_images_per_sec", "head_training_images_per_sec", "eval_images_per_sec",
                    "trainable_params", "wall_seconds"]


def compare_runs(run_dirs: list[str | Path]) -> dict:
    """Metrics side by side, and the config settings whose values differ."""
    if len(run_dirs) < 2:
        raise UserError("compare needs at least two run directories")
    runs = []
    for run_dir in run_dirs:
        if not RunDir(run_dir).metrics.is_file():
            raise UserError(f"{run_dir} is not a finished run (no metrics.json)")
        runs.append(_load(Path(run_dir)))
        if runs[-1].get("damaged"):
            raise UserError(f"{run_dir} is damaged ({runs[-1]['damaged']}): compare other runs")
    keys = sorted(set().union(*(r["config"] for r in runs)))
    differences = {k: [r["config"].get(k) for r in runs] for k in keys
                   if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1}
    metrics = {k: [r["metrics"].get(k) for r in runs] for k in COMPARED_METRICS
               if any(k in r["metrics"] for r in runs)}
    return {"runs": [r["run"] for r in runs], "metrics": metrics, "config_differences": differences}


def comparison_table(comparison: dict) -> str:
    names = [Path(r).name for r in comparison["runs"]]
    width = max(14, *(len(n) for n in names))

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("—" if v is None else str(v))

    lines = [f"{'':24}" + "".join(f"{n:>{width + 2}}" for n in names)]
    lines += [f"{k:24}" + "".join(f"{fmt(v):>{width + 2}}" for v in values)
              for k, values in comparison["metrics"].items()]
    lines.append("config differences:" if comparison["config_differences"] else "same config")
    lines += [f"  {k:22}" + "".join(f"{fmt(v):>{width + 2}}" for v in values)
              for k, values in comparison["config_differences"].items()]
    return "\n".join(lines)
