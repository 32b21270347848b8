"""Search-space files: which run settings a study draws, and from where.

    lr: {low: 1.0e-4, high: 1.0e-1, log: true}    # floats; log-uniform
    epochs: {low: 2, high: 8}                      # integers when both bounds are
    batch_size: {choices: [16, 32, 64]}            # categorical
    unfreeze_last: {low: 0, high: 3}               # 0: feature extractor; N: the last N stages train

Any setting of `warmstart train` may be drawn except where the data is, where runs go and how
they report. A drawn `recipe` brings its settings (over the base config's); other drawn values
override both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, field_kind
from ..errors import UserError, excerpt
from ..files import load_yaml
from ..recipes import recipe_settings

SPEC_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class Parameter:
    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.low, bool)

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def trial_values(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The run settings of a trial: the base config, a drawn recipe over it, drawn values over both."""
    values = dict(base)
    params = dict(params)
    if params.get("recipe") is not None:
        values.update(recipe_settings(params["recipe"]))
    if "unfreeze_last" in params:
        stages = params.pop("unfreeze_last")
        values.update(strategy="partial", unfreeze_last=stages) if stages else \
            values.update(strategy="feature-extractor", unfreeze_last=None)
        values.pop("trainable", None)
    values.update(params)
    return values


def load_space(path: str | Path, base: dict[str, Any]) -> list[Parameter]:
    """Read and check a space file: known settings, well-formed ranges, and values a run accepts."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"space file {path} does not exist: pass a YAML file of setting: range (see "
                        f"examples/tune-space.yaml)")
    try:
        raw = load_yaml(path.read_text(), f"space file {path}") or {}
    except yaml.YAMLError as exc:
        raise UserError(f"space file {path} is not valid YAML ({exc.__class__.__name__}): fix its syntax")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"space file {path} must map each setting to a range, e.g. 'lr: {{low: 1e-4, high: 1e-1, "
                        f"log: true}}'")
    tunable = sorted(f.name for f in fields(RunConfig) if f.metadata["tunable"])
    parameters = []
    for key, spec in raw.items():
        name = str(key).replace("-", "_")
        where = f"{path}: {key}"
        if name not in tunable:
            raise UserError(f"{where}: unknown parameter; tunable settings are {', '.join(tunable)}")
        parameter = _parameter(name, spec, where)
        kind, is_list, _ = field_kind(next(f for f in fields(RunConfig) if f.name == name))
        if parameter.choices is None and (is_list or kind not in ("int", "float")):
            raise UserError(f"{where}: {name} is not a number: give {{choices: [...]}}")
        parameters.append(parameter)
    for parameter in parameters:  # every bound and choice must make a valid run on its own
        for value in parameter.extremes():
            try:
                RunConfig.from_dict(trial_values(base, {parameter.name: value}), source=where)
            except UserError as exc:
                raise UserError(f"{path}: {parameter.name} = {excerpt(value)} is not a valid run: "
                                f"{str(exc).split(': ', 1)[-1]}") from None
    return parameters


def _parameter(name: str, spec: Any, where: str) -> Parameter:
    if not isinstance(spec, dict):
        raise UserError(f"{where}: write {{low: A, high: B}} (optionally log: true, step: S) or {{choices: [...]}}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; use low/high/log/step or choices")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise UserError(f"{where}: choices do not combine with low/high/log/step")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list")
        return Parameter(name, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: a range needs both low and high (or give choices)")
    low, high = spec["low"], spec["high"]
    # YAML reads 1e-4 (no dot) as a string: accept it as the number it means
    low, high = (_number(v, where) for v in (low, high))
    if not low < high:
        raise UserError(f"{where}: bad range, low {low} must be below high {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: bad range, a log range needs low > 0 (got {low})")
    step = spec.get("step")
    if step is not None:
        step = _number(step, where)
        if step <= 0 or log:
            raise UserError(f"{where}: step must be > 0 and does not combine with log")
    return Parameter(name, low, high, log, step)


def _number(value: Any, where: str) -> int | float:
    if isinstance(value, bool):
        raise UserError(f"{where}: {excerpt(value)} is not a number")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {excerpt(value)} is not a number") from None
