"""What every training path works with: the run's settings, where it computes, how it reports,
and where it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..models.pretrained_classes import PretrainedStart
from ..compute.distributed import Distributed
from ..compute.runtime import Runtime
from ..progress import Reporter
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
    pretrained: PretrainedStart | None = None  # the head's start from the pretrained classifier (None: from zero)
    on_epoch: Callable[[dict], None] | None = None  # the caller's per-epoch callback (may raise to stop)
