"""Training: the loop, schedules, and one run end to end."""

from .run import RunResult, train
from .schedule import lr_factor

__all__ = ["RunResult", "train", "lr_factor"]
