"""Hyper-parameter search over run settings (Optuna)."""

from .space import Parameter, load_space, trial_values
from .study import StudyOptions, TuneResult, tune

__all__ = ["Parameter", "StudyOptions", "TuneResult", "load_space", "trial_values", "tune"]
