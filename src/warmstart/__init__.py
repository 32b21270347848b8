"""warmstart: transfer learning for image classifiers, from ImageNet-pretrained timm networks.

    import warmstart
    result = warmstart.train(warmstart.RunConfig(data="path/to/images", epochs=10))
    warmstart.evaluate(result.run_dir, split="val")
    warmstart.predict(result.run_dir, ["dog.jpg"])
"""

__version__ = "0.1.0"

from .config import RunConfig  # noqa: E402
from .errors import UserError  # noqa: E402

try:
    import torch  # noqa: F401
except ImportError:  # an inference-only install: ONNX predict and serve work without torch
    pass
else:
    # The `train` subpackage is imported first so that the name `warmstart.train` ends up
    # bound to the function below, not to the subpackage.
    from .train.run import RunResult, train  # noqa: E402
    from .evaluate import evaluate_run as evaluate  # noqa: E402
    from .predict import predict  # noqa: E402
    from .quickstart import quickstart  # noqa: E402
    from .train.lr_find import lr_find  # noqa: E402
    from .tune import tune  # noqa: E402

__all__ = ["RunConfig", "RunResult", "UserError", "train", "evaluate", "predict", "quickstart", "lr_find", "tune",
           "__version__"]
