"""Training, from one decision: `choose_training_path` says which path a run takes and why; the
path's trainer (TRAINERS: one line each) runs its epochs through the one driver (`driver.drive`)."""

from __future__ import annotations

from ..models.trainable import TrainableSet
from .head import train_on_activations, train_on_features
from .images import train_on_images
from .paths import ACTIVATIONS, FEATURES, IMAGES, FitRequest, choose_training_path
from .session import Session
from .steps import FitResult

# each training path's trainer: a new path is its module (an EpochLoop and a trainer) plus a line
# here, and the rule that chooses it in choose_training_path
TRAINERS = {FEATURES: train_on_features, ACTIVATIONS: train_on_activations, IMAGES: train_on_images}


def fit(model, trainable: TrainableSet, splits: dict, session: Session, arch: str = "",
        resume: dict | None = None, include_val: bool = False) -> FitResult:
    """Train as the run's settings say, on the path `choose_training_path` decides. `include_val`
    (a refit): train on val's images too, with no validation."""
    path = choose_training_path(session.config, model, trainable, session.data_config["input_size"],
                                session.dist.active)
    (session.reporter.warn if path.warning else session.reporter.info)(f"training on {path.kind}: {path.reason}")
    result = TRAINERS[path.kind](FitRequest(model, trainable, splits, session, arch, path, resume, include_val))
    result.path = path.kind + (" (L-BFGS)" if session.config.optimizer == "lbfgs" else "")
    return result
