"""warmstart: transfer learning for image classifiers, from ImageNet-pretrained timm networks.

    import warmstart
    result = warmstart.train(warmstart.RunConfig(data="path/to/images", epochs=10))
    warmstart.evaluate(result.run_dir, split="val")
    warmstart.predict(result.run_dir, ["dog.jpg"])
"""

from ._version import __version__
from .config import RunConfig
from .errors import UserError

try:
    import torch  # noqa: F401
except ImportError:  # an inference-only install: ONNX predict and serve work without torch
    pass
else:
    # `warmstart.train` is the function (the subpackage stays importable as `warmstart.train.run` etc.)
    from .evaluate import evaluate_run as evaluate
    from .predict import predict
    from .quickstart import quickstart
    from .train.lr_find import lr_find
    from .train.run import RunResult, train
    from .tune import tune

__all__ = ["RunConfig", "RunResult", "UserError", "train", "evaluate", "predict", "quickstart", "lr_find", "tune",
           "__version__"]
