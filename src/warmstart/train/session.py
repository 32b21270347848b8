"""What every training path works with: the run's settings, where it computes, how it reports,
and where it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .distributed import Distributed
from .runtime import Reporter, Runtime
from .history import QuietLog


@dataclass
class Session:
    config: object  # the run's RunConfig (resolved)
    data_config: dict
    runtime: Runtime
    reporter: Reporter
    log: object = field(default_factory=QuietLog)  # TrainingLog, or anything with step/epoch/predictions
    dist: Distributed = field(default_factory=Distributed)
    cache_dir: Path = Path(".")
    checkpoints: Path | None = None  # where checkpoints go (None: not written, e.g. on ranks other than 0)
