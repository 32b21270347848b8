"""Where and how a run computes, decided once from its config and the machine: the device,
precision, memory format and image pipeline; and the loaders, built here so that every pass over
images (training, extraction, validation, evaluation, lr-find) goes the same way."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..data.batched import runs_batched
from ..data.loaders import EpochBatches, Pass, make_loader, passes_loader
from ..data.shards import stream_ids
from ..data.transforms import train_transform
from ..errors import UserError
from ..models.fold import fold_batchnorm
from ..models.outputs import (Classified, PreLogits, architecture, as_used, backbone_fingerprint,
                              splits_at_classifier)
from .engine import (EXPORT_PAYS_BACK, EngineUnavailable, GraphCache, OnnxForward, TorchForward, choose_engine,
                     identity_of, _stderr)


def resolve_pipeline(choice: str, device: torch.device) -> str:
    """--pipeline as it runs on `device`: auto is the batched GPU pipeline on CUDA and the per-sample
    one elsewhere (on a CPU the workers' PIL path measured faster: BENCHMARKS.md §3)."""
    if choice == "gpu" and device.type != "cuda":
        raise UserError("--pipeline gpu needs a CUDA GPU and none is visible: use --pipeline cpu (or auto)")
    return "gpu" if choice == "gpu" or (choice == "auto" and device.type == "cuda") else "cpu"


@dataclass
class Runtime:
    """Where and how tensors are computed: device, precision, memory format, compilation, and the
    engine that computes frozen forwards (compute/engine.py)."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True
    pipeline: str = "cpu"  # where images are decoded and augmented: "cpu" (workers) or "gpu" (batched)
    engine: str = "torch"  # what computes frozen forwards: "torch" or "onnxruntime"
    engine_choice: str = "torch"  # --engine as given (auto falls back to PyTorch where the engine cannot go)
    engine_reason: str = ""

    @classmethod
    def for_config(cls, config, local_rank: int = 0) -> "Runtime":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if config.precision == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a GPU: use --precision bf16 on the CPU")
        engine, reason = choose_engine(config.engine, device, config.precision)
        return cls(device, config.precision, config.channels_last, resolve_pipeline(config.pipeline, device),
                   engine, config.engine, reason)

    def engine_line(self) -> str:
        name = "onnxruntime" if self.engine == "onnxruntime" else "PyTorch"
        return f"engine: {name} computes the frozen network ({self.engine_reason})"

    @property
    def batched_on(self) -> torch.device | None:
        """The device that decodes and augments batches (the batched pipeline), or None: workers do."""
        return self.device if self.pipeline == "gpu" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def for_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` prepared, as a copy with its BatchNorms folded into its convolutions where that
        computes the same (models.fold): for extraction, evaluation and prediction, never training."""
        return fold_batchnorm(self.prepare(model))

    def frozen(self, module: torch.nn.Module, name: str, weights: str, input_size, say=None,
               images: int | None = None):
        """`module`'s forward for inference (never training), computed by the run's engine: a callable
        from images to outputs whose `engine` says which computes it. `name` and `weights` (the
        fingerprint of what it computes) key the engine's graph; `input_size` is (C, H, W). Where
        onnxruntime cannot take the module, --engine auto falls back to PyTorch with one line and
        --engine onnxruntime is a UserError. `images`: how many this forward will see, where known:
        under auto, a graph not exported yet is exported only if they repay it (EXPORT_PAYS_BACK)."""
        say = say or _stderr
        if self.engine == "onnxruntime":
            identity, cache = identity_of(name, weights, type(module).__name__), GraphCache()
            if self.engine_choice == "auto" and images is not None and images < EXPORT_PAYS_BACK and \
                    not cache.holds({**identity, "input": list(input_size)}):
                say(f"engine: PyTorch computes {name} for these {images} images: exporting its graph for "
                    f"onnxruntime would cost more than it saves (it pays back from about {EXPORT_PAYS_BACK})")
                return TorchForward(self.forward(self.for_inference(module)))
            try:
                return OnnxForward(module, identity, input_size, say, cache)
            except EngineUnavailable as exc:
                if self.engine_choice == "onnxruntime":
                    raise UserError(f"--engine onnxruntime cannot compute {name}: {exc}; use --engine torch "
                                    f"(or auto)") from None
                say(f"engine: PyTorch computes {name}: onnxruntime cannot take it ({exc})")
        return TorchForward(self.forward(self.for_inference(module)))

    def classify(self, network: torch.nn.Module, input_size, tta: bool = False, temperature: float | None = None,
                 say=None, images: int | None = None):
        """A trained network's logits (mirror-averaged with `tta`, divided by `temperature`) for
        inference: its pooled features by the run's engine (the graph extraction uses for the
        same backbone), its classifier in PyTorch. `images`: as for `frozen`."""
        if self.engine == "onnxruntime" and not splits_at_classifier(network, input_size):
            reason = "its logits are not its classifier applied to its pooled features"
            if self.engine_choice == "onnxruntime":
                raise UserError(f"--engine onnxruntime cannot compute {architecture(network)}: {reason}; use --engine "
                                f"torch (or auto)")
            (say or _stderr)(f"engine: PyTorch computes {architecture(network)}: {reason}")
        elif self.engine == "onnxruntime":
            features = self.frozen(PreLogits(network), f"{architecture(network)} pooled features",
                                   backbone_fingerprint(network), input_size, say, images)
            if features.engine == "onnxruntime":
                model = as_used(Classified(features, network.get_classifier()), tta, temperature).eval()
                return TorchForward(model, features.engine)
        return TorchForward(self.forward(self.for_inference(as_used(network, tta, temperature))))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images on the run's device in its memory format, whichever pipeline made them (the batched
        one hands over channels_last batches: --no-channels-last gets NCHW all the same)."""
        images = images.to(self.device, non_blocking=True)
        if images.ndim != 4:
            return images
        return images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, module):
        """`module` as the run computes it: inputs moved and formatted, under the run's precision."""
        def run(images: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return module(self.inputs(images))

        return run

    @classmethod
    def for_machine(cls) -> "Runtime":
        """The default settings' runtime on this machine (library calls given no run's)."""
        from ..config import RunConfig

        return cls.for_config(RunConfig())

    @classmethod
    def for_run(cls, run_dir, engine: str | None = None) -> "Runtime":
        """A trained run's runtime on this machine, from its saved config (as it trained and
        evaluated: precision, memory format, pipeline, engine, unless `engine` is given); a run
        without one computes in fp32."""
        from ..config import RunConfig
        from ..run_dir import RunDir

        saved = RunDir(run_dir).config
        config = RunConfig.from_yaml(saved) if saved.is_file() else RunConfig(precision="fp32", channels_last=False)
        if config.precision == "fp16" and not torch.cuda.is_available():
            config = config.replace(precision="fp32")  # trained on a GPU, used on a CPU
        if config.pipeline == "gpu" and not torch.cuda.is_available():
            config = config.replace(pipeline="cpu")
        if config.engine == "onnxruntime" and torch.cuda.is_available():
            config = config.replace(engine="auto")  # trained on a CPU, used where a GPU computes
        return cls.for_config(config.replace(engine=engine) if engine else config)

    # -- loaders: every pass over images is built here, with the run's pipeline --------------
    def loader(self, images, transform, batch_size: int, workers: int | None = None, order=None,
               item_seed: int | None = None, epochs: int = 1):
        """Batches of `images` in `transform`'s view (in order, or in `order`'s: EpochBatches)."""
        return make_loader(images, transform, batch_size, workers, order, item_seed, epochs, self.batched_on)

    def training_loader(self, train_set, data_config: dict, config, rank: int = 0, world: int = 1,
                        epochs: int | None = None):
        """The training images as the run sees them: its augmentation, batch size, seeded order and
        balancing, this rank's share (for `epochs`, default the run's: workers live that long)."""
        order = EpochBatches(train_set.labels, config.batch_size, config.seed, config.balance, rank, world,
                             stream_ids(train_set.items), config.shuffle_buffer)
        return self.loader(train_set, train_transform(data_config, config.augment), config.batch_size,
                           config.workers, order, epochs=config.epochs if epochs is None else epochs)

    def passes(self, passes: list[Pass], batch_size: int, workers: int | None = None):
        """(pass number, Batch) for several passes through one set of workers (extraction)."""
        return passes_loader(passes, batch_size, workers, self.batched_on)

    def runs_batched(self, transform) -> bool:
        """Whether this view goes through the batched pipeline (its pixels may differ slightly)."""
        return runs_batched(transform, self.batched_on)

    def grad_scaler(self):
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
