"""Hyper-parameter search on Optuna: every trial is a normal training run in its own run directory,
scored by validation top-1 (never test), pruned early from its per-epoch validation accuracy.

The study lives in a database (a SQLite file in the study folder unless `storage` names another):
re-running the same command resumes it, and several processes or machines given the same
storage work on it together until it holds `trials` finished trials.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, check_declared, setting
from ..errors import Diverged, UserError
from ..files import load_yaml, spreadsheet_safe_row
from ..run_dir import RunDir
from .space import load_space, trial_values

FINISHED = ("COMPLETE", "PRUNED")
HEARTBEAT_S, GRACE_S = 20, 60  # a trial whose process died is failed (and retried) after GRACE_S


@dataclass
class TuneResult:
    study_dir: Path
    storage: str
    study_name: str
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Path | None
    trials_csv: Path
    finished: int


def _open_study(url: str, study_name: str, seed: int, optuna):
    """Create or load the study. Workers starting together race to create the database's tables;
    the losers see an error from the database and simply try again."""
    for attempt in range(6):
        try:
            storage = url
            if url.startswith(("sqlite:", "postgresql", "mysql")):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # heartbeats are marked experimental
                    storage = optuna.storages.RDBStorage(
                        url, engine_kwargs={"connect_args": {"timeout": 120}} if url.startswith("sqlite:") else {},
                        heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            return optuna.create_study(
                study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
                # a different stream per joining worker, reproducible for a study run by one process
                sampler=optuna.samplers.TPESampler(seed=seed + int(os.environ.get("WARMSTART_TUNE_WORKER", 0))),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
        except UserError:
            raise
        except Exception as exc:
            if "sqlalchemy" not in type(exc).__module__ or attempt == 5:
                raise UserError(f"--storage {url}: cannot open the study ({exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0][:160]})") from None
            time.sleep(0.5 + random.random() * (attempt + 1))


@dataclass
class StudyOptions:
    """Where a study lives and how it runs: each option declared once (its `warmstart tune` flag,
    default, help and bounds come from here)."""

    storage: str | None = setting(None, "Optuna database URL shared by workers (default: a SQLite file in the study "
                                  "folder)", group="study", metavar="URL")
    study: str | None = setting(None, "study name (default: the base config's file name)", group="study",
                                metavar="NAME")
    study_dir: str | None = setting(None, "study folder: trials, table, best config, plots (default "
                                    "studies/<study>)", group="study", metavar="DIR")
    timeout: float | None = setting(None, "stop starting trials after S seconds", group="study", metavar="S",
                                    bounds="(0, inf)")
    seed: int = setting(0, "sampler seed", group="study")
    processes: int = setting(1, "worker processes on this machine", group="study", bounds="[1, 256]")
    quiet: bool = setting(False, "no table at the end", group="study")

    def __post_init__(self) -> None:
        check_declared(self)


def tune(base_config: str | Path, space_file: str | Path, trials: int,
         options: StudyOptions | None = None) -> TuneResult:
    """Run (or resume, or join) a study until it holds `trials` finished trials or `timeout`
    seconds pass; then write the trials table, the best config and the plots."""
    import optuna

    options = options or StudyOptions()
    storage, study_name, study_dir, timeout = options.storage, options.study, options.study_dir, options.timeout
    seed, processes, quiet = options.seed, options.processes, options.quiet
    if trials < 1:
        raise UserError(f"--trials {trials} is not valid: it must be >= 1")
    base_path = Path(base_config)
    RunConfig.from_yaml(base_path)  # a broken base config fails here, as one line
    base = load_yaml(base_path.read_text(), base_path) or {}
    base = {str(k).replace("-", "_"): v for k, v in base.items()}
    space = load_space(space_file, base)
    study_name = study_name or base_path.stem
    study_dir = Path(study_dir or Path("studies") / study_name)
    study_dir.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    argv = ["tune", "--config", str(base_path), "--space", str(space_file), "--trials", str(trials), "--study",
            study_name, "--storage", storage_url, "--study-dir", str(study_dir), "--seed", str(seed), "--quiet"]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    helpers = [_spawn_worker(i, argv) for i in range(1, processes)]
    try:
        study = _open_study(storage_url, study_name, seed, optuna)
        remaining = trials - _count_finished(study)
        if remaining > 0:
            study.optimize(
                lambda trial: _objective(trial, base, space, study_dir, quiet), n_trials=remaining, timeout=timeout,
                catch=(UserError,),
                callbacks=[optuna.study.MaxTrialsCallback(
                    trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))])
    finally:
        for helper in helpers:
            helper.wait()
    return _summarise(study, base, study_dir, storage_url, quiet)


def _spawn_worker(index: int, argv: list[str]) -> subprocess.Popen:
    """One more process running this study (GPUs shared round-robin)."""
    env = dict(os.environ, WARMSTART_TUNE_WORKER=str(index))
    try:
        import torch

        if torch.cuda.device_count() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(index % torch.cuda.device_count())
    except ImportError:
        pass
    return subprocess.Popen([sys.executable, "-m", "warmstart", *argv], env=env)


def _count_finished(study) -> int:
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def _objective(trial, base: dict, space, study_dir: Path, quiet: bool) -> float:
    import optuna

    from ..train.run import train
    from ..progress import Reporter

    params = {p.name: p.suggest(trial) for p in space}
    run_dir = study_dir / "trials" / f"trial-{trial.number:04d}"
    for again in range(1, 1000):  # runs of an earlier study in this folder stay as they are
        if not RunDir(run_dir).trained:
            break
        run_dir = study_dir / "trials" / f"trial-{trial.number:04d}-{again}"
    values = trial_values(base, params)
    values.update(out=str(run_dir), quiet=True)
    config = RunConfig.from_dict(values, source=f"trial {trial.number}")
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", int(os.environ.get("WARMSTART_TUNE_WORKER", 0)))

    def report(record: dict) -> None:
        if "val_top1" in record:
            trial.report(record["val_top1"], record["epoch"] - 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val top-1 {record['val_top1']:.4f} after epoch {record['epoch']}")

    try:
        result = train(config, reporter=Reporter(quiet=True, silent=True), on_epoch=report)
    except Diverged as exc:  # settings the space allows but the data cannot take: this trial only
        raise optuna.TrialPruned(str(exc)) from None
    trial.set_user_attr("val_top5", result.metrics["top5"])
    trial.set_user_attr("wall_seconds", result.metrics["wall_seconds"])
    if not quiet:
        drawn = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"trial {trial.number}: val top-1 {result.metrics['top1']:.4f} in {result.metrics['wall_seconds']:.0f}s "
              f"({drawn})", flush=True)
    return result.metrics["top1"]


def _summarise(study, base: dict, study_dir: Path, storage_url: str, quiet: bool) -> TuneResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    ordered = sorted(trials, key=lambda t: (t.state.name != "COMPLETE", -(t.value or 0.0), t.number))
    names = sorted({k for t in trials for k in t.params})
    table = study_dir / "trials.csv"
    rows = [[t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}",
             *[t.params.get(n, "") for n in names],
             "" if t.duration is None else f"{t.duration.total_seconds():.1f}", t.user_attrs.get("run_dir", "")]
            for t in ordered]
    header = ["trial", "state", "val_top1", *names, "seconds", "run_dir"]
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(spreadsheet_safe_row(row) for row in rows)
    best_config = None
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    if best is not None:
        values = trial_values(base, best.params)
        values.pop("out", None)
        best_config = study_dir / "best_config.yaml"
        best_config.write_text(
            f"# best trial {best.number} of study {study.study_name}: val top-1 {best.value:.4f}\n"
            f"# (run {best.user_attrs.get('run_dir')}); re-run: warmstart train --config {best_config}\n"
            + yaml.safe_dump(RunConfig.from_dict(values).to_dict() | {"out": None}, sort_keys=False))
    _plots(study, study_dir)
    if not quiet:
        _print_table(header, rows)
        if best is not None:
            print(f"best: trial {best.number}, val top-1 {best.value:.4f}; config {best_config}; "
                  f"table {table}; {len(complete)} complete of {len(trials)} trials")
    return TuneResult(study_dir, storage_url, study.study_name, best.value if best else None,
                      dict(best.params) if best else {}, best_config, table,
                      sum(t.state.name in FINISHED for t in trials))


def _print_table(header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row[:-1]]
                                          for row in rows]
    cells[0] = cells[0][:-1]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _plots(study, study_dir: Path) -> None:
    """Optimisation history and parameter importance as PNG (importance needs 2+ complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        logging.getLogger("optuna").setLevel(logging.ERROR)
        for name, plot in (("optimization_history", ovm.plot_optimization_history),
                           ("param_importances", ovm.plot_param_importances)):
            if name == "param_importances" and (len(complete) < 2 or not complete[0].params):
                continue
            try:
                axes = plot(study)
            except (ValueError, RuntimeError):  # e.g. no parameter varied
                continue
            axes.figure.set_size_inches(8, 5)
            axes.figure.tight_layout()
            axes.figure.savefig(study_dir / f"{name}.png", dpi=100)
            plt.close(axes.figure)
