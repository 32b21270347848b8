"""Hyper-parameter search: a tiny study, shared SQLite storage, resuming, the best config, space checks."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from warmstart import RunConfig, train
from warmstart.cli import main
from warmstart.errors import UserError
from warmstart.tune import StudyOptions, load_space, tune

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by the inner loop (-m "not slow")

BASE = {"input_size": 64, "workers": 0, "epochs": 1, "augment": "none", "batch_size": 8, "optimizer": "adamw"}
SPACE = {"lr": {"low": 1e-4, "high": 3e-2, "log": True}, "label_smoothing": {"low": 0.0, "high": 0.2},
         "epochs": {"low": 1, "high": 2}}


def _files(tmp_path: Path, data: Path, **base) -> tuple[Path, Path]:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": str(data), **BASE, **base}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return tmp_path / "base.yaml", tmp_path / "space.yaml"


def _trials(storage: str, name: str):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_tiny_study_writes_table_best_config_and_plots_and_the_best_config_reproduces(color_tree, tmp_path, capsys):
    base, space = _files(tmp_path, color_tree)
    result = tune(base, space, 3, StudyOptions(study_dir=tmp_path / "study"))
    trials = _trials(result.storage, result.study_name)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and result.finished == 3
    runs = {t.user_attrs["run_dir"] for t in trials}
    assert len(runs) == 3 and all((Path(r) / "metrics.json").is_file() for r in runs)
    rows = list(csv.DictReader(result.trials_csv.open()))
    assert [float(r["val_top1"]) for r in rows] == sorted((t.value for t in trials), reverse=True)
    assert set(rows[0]) >= {"trial", "state", "val_top1", "lr", "label_smoothing", "epochs", "run_dir"}
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "study" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "best: trial" in capsys.readouterr().out
    # the best config runs as is and scores what its trial scored (on val, never test)
    best = max(trials, key=lambda t: t.value)
    config = RunConfig.from_yaml(result.best_config, {"out": str(tmp_path / "again")})
    assert config.lr == pytest.approx(best.params["lr"]) and config.epochs == best.params["epochs"]
    assert train(config).metrics["top1"] == pytest.approx(best.value)
    # running the finished study again starts no trial
    assert tune(base, space, 3, StudyOptions(study_dir=tmp_path / "study", quiet=True)).finished == 3
    assert len(_trials(result.storage, result.study_name)) == 3


def _tune_command(base, space, study_dir, storage, trials):
    return [sys.executable, "-m", "warmstart", "tune", "--config", str(base), "--space", str(space), "--trials",
            str(trials), "--study-dir", str(study_dir), "--storage", storage, "--study", "shared", "--quiet"]


def test_two_workers_share_one_sqlite_study_without_duplicates_or_losses(color_tree, tmp_path):
    base, space = _files(tmp_path, color_tree)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = _tune_command(base, space, tmp_path / "study", storage, 4)
    workers = [subprocess.Popen(command, env=dict(os.environ, WARMSTART_TUNE_WORKER=str(i))) for i in range(2)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    trials = _trials(storage, "shared")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5  # each worker stops once the study holds 4; one may be in flight
    assert len({t.number for t in trials}) == len(trials)
    runs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(runs)) == len(runs) and all((Path(r) / "metrics.json").is_file() for r in runs)
    assert sorted(p.name for p in (tmp_path / "study" / "trials").iterdir()) == sorted(Path(r).name for r in runs)


def test_interrupted_study_resumes_where_it_stopped(color_tree, tmp_path):
    base, space = _files(tmp_path, color_tree, epochs=2)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = _tune_command(base, space, tmp_path / "study", storage, 3)
    first = subprocess.Popen(command, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (list((tmp_path / "study").glob("trials/*/metrics.json")) and any(
            t.state.name == "COMPLETE" for t in _trials(storage, "shared"))):
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # as a crash or a lost machine would, right after the first trial
    first.wait()
    done_before = [t for t in _trials(storage, "shared") if t.state.name == "COMPLETE"]
    assert 1 <= len(done_before) < 3
    stamp = {t.number: (Path(t.user_attrs["run_dir"]) / "metrics.json").stat().st_mtime for t in done_before}
    assert subprocess.run(command, timeout=600).returncode == 0
    trials = _trials(storage, "shared")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    for number, mtime in stamp.items():  # finished trials are kept, not re-run
        trial = next(t for t in complete if t.number == number)
        assert (Path(trial.user_attrs["run_dir"]) / "metrics.json").stat().st_mtime == mtime


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"low": 0.1, "high": 1}}, "unknown parameter"),
    ({"data": {"choices": ["a", "b"]}}, "unknown parameter"),
    ({"lr": {"low": 0.1, "high": 0.01}}, "bad range"),
    ({"lr": {"low": 0, "high": 0.1, "log": True}}, "log range needs low > 0"),
    ({"lr": {"low": 0.1}}, "needs both low and high"),
    ({"lr": {"min": 0.1, "max": 1}}, "unknown key"),
    ({"optimizer": {"choices": ["sgd", "lion"]}}, "optimizer = 'lion' is not a valid run"),
    ({"label_smoothing": {"low": 0.0, "high": 1.5}}, "label_smoothing = 1.5 is not a valid run"),
    ({"batch_size": {"choices": []}}, "non-empty list"),
    ({"lr": [0.1, 1]}, "write {low: A, high: B}"),
])
def test_space_files_are_validated_with_clear_errors(tmp_path, space, message):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_space(tmp_path / "space.yaml", {"data": "x"})


def test_space_accepts_the_example_file_and_maps_unfrozen_stages(tmp_path, capsys):
    from warmstart.tune import trial_values

    example = Path(__file__).resolve().parents[1] / "examples" / "tune-space.yaml"
    names = {p.name for p in load_space(example, {"data": "x"})}
    assert {"lr", "weight_decay", "epochs", "batch_size", "unfreeze_last", "augment", "optimizer"} <= names
    assert trial_values({"data": "x"}, {"unfreeze_last": 0})["strategy"] == "feature-extractor"
    assert trial_values({"data": "x"}, {"unfreeze_last": 2}) == {"data": "x", "strategy": "partial",
                                                               "unfreeze_last": 2}
    drawn = trial_values({"data": "x", "strategy": "fine-tune", "epochs": 3}, {"recipe": "linear-probe"})
    assert drawn["strategy"] == "feature-extractor" and drawn["optimizer"] == "lbfgs"  # a drawn recipe brings its own
    (tmp_path / "bad.yaml").write_text("lr: {low: 1, high: 0.1}\n")
    (tmp_path / "base.yaml").write_text("data: x\n")
    code = main(["tune", "--config", str(tmp_path / "base.yaml"), "--space", str(tmp_path / "bad.yaml"),
                 "--trials", "2", "--study-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad range" in err and "bad.yaml" in err


def test_a_trial_is_pruned_from_its_per_epoch_validation_accuracy(color_tree, tmp_path):
    from warmstart.tune.space import Parameter
    from warmstart.tune.study import _objective

    class PruneAfterFirstReport(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return bool(trial.intermediate_values)

    study = optuna.create_study(direction="maximize", pruner=PruneAfterFirstReport())
    base = {"data": str(color_tree), **BASE, "epochs": 3}
    study.optimize(lambda trial: _objective(trial, base, [Parameter("lr", 1e-3, 1e-2, log=True)], tmp_path, True),
                   n_trials=1)
    trial = study.trials[0]
    assert trial.state.name == "PRUNED"
    assert list(trial.intermediate_values) == [0] and 0 <= trial.intermediate_values[0] <= 1
    assert not (Path(trial.user_attrs["run_dir"]) / "model.safetensors").exists()  # stopped after epoch 1


def test_processes_flag_runs_workers_on_this_machine(color_tree, tmp_path):
    base, space = _files(tmp_path, color_tree)
    result = tune(base, space, 3, StudyOptions(study_dir=tmp_path / "study", processes=2, quiet=True))
    trials = _trials(result.storage, result.study_name)
    assert result.finished >= 3 and len({t.number for t in trials}) == len(trials)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["run_dir"] for t in complete}) == len(complete) >= 3
    assert {t.user_attrs["worker"] for t in complete} <= {0, 1}
