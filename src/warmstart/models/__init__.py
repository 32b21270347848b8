"""Models: create, restore weights, choose what trains."""

from .create import build_model, create_model
from .registry import list_model_names, model_info, resolve_architecture
from .trainable import TrainableSet, apply_strategy, set_train_mode
from .weights import RestoreReport, restore_weights

__all__ = ["build_model", "create_model", "list_model_names", "model_info", "resolve_architecture",
           "TrainableSet", "apply_strategy", "set_train_mode", "RestoreReport", "restore_weights"]
