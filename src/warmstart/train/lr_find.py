"""The learning-rate finder (Smith 2015; fastai's lr_find): train for a few hundred steps while the
learning rate grows exponentially, smooth the loss, and suggest the rate where it falls fastest."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..errors import UserError
from ..models.trainable import set_train_mode
from ..run_dir import RunDir
from ..stop import check
from .mixing import BatchMixer
from .run import build
from ..compute.runtime import Runtime
from ..progress import Reporter
from .steps import build_optimizer, make_criterion, train_step

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected
DIVERGED = 4.0  # stop once the smoothed loss exceeds this x its minimum


@dataclass
class LrFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float | None = None
    diverged: bool = False
    out: Path | None = None

    @property
    def flag(self) -> str:
        return f"--lr {self.suggestion:.2e}" if self.suggestion is not None else ""


def suggest_lr(lrs: list[float], smoothed: list[float], skip_start: int = 5) -> float | None:
    """The rate where the smoothed loss falls fastest (steepest slope against log lr), before its
    minimum; with too short a descent, a tenth of the rate at the minimum."""
    if len(lrs) < 3:
        return None
    losses = np.asarray(smoothed)
    lowest = int(np.argmin(losses))
    start = min(skip_start, max(lowest - 2, 0))
    if lowest - start >= 2:
        slopes = np.gradient(losses[start:lowest + 1], np.log10(lrs[start:lowest + 1]))
        return float(lrs[start + int(np.argmin(slopes))])
    return float(lrs[lowest] / 10)


def lr_find(config: RunConfig, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            reporter: Reporter | None = None) -> LrFindResult:
    """Sweep the learning rate from `start_lr` to `end_lr` over `steps` optimizer steps of the run
    `config` describes (its model, weights, trainable set, data, augmentation and loss). Writes
    lr_find.png, lr_find.csv and lr_find.json to `config.out` (default runs/lr-find-<time>)."""
    config = config.validated()
    if not 0 < start_lr < end_lr:
        raise UserError(f"--start-lr {start_lr} and --end-lr {end_lr}: need 0 < start < end")
    if config.optimizer == "lbfgs":
        raise UserError("--optimizer lbfgs fits the head to convergence with a line search: there is no learning "
                        "rate to find; sweep with --optimizer sgd or adamw")
    if steps < 10:
        raise UserError(f"--steps {steps} is too few for a sweep: use at least 10 (100-300 is usual)")
    reporter = reporter or Reporter(config.quiet)
    out = Path(config.out or f"runs/lr-find-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.for_config(config)
    built = build(config, reporter)
    model, train_set = built.model, built.splits["train"]
    runtime.prepare(model)
    set_train_mode(model, built.trainable)
    optimizer = build_optimizer(model, config)
    ratios = [group["lr"] / config.resolved_lr() for group in optimizer.param_groups]  # head rate, layer decay
    criterion = make_criterion(config, train_set.labels, len(train_set.class_ids), runtime.device)
    mix = BatchMixer(config, len(train_set.class_ids))
    loader = runtime.training_loader(train_set, built.data_config, config,
                                     epochs=math.ceil(steps * config.batch_size / max(len(train_set), 1)) + 1)
    scaler = runtime.grad_scaler()
    result, average, best = LrFindResult(out=out), 0.0, math.inf
    epoch = 0
    with reporter.bar(steps, "lr sweep", unit="step") as bar:
        while len(result.lrs) < steps and not result.diverged:
            loader.batch_sampler.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                check()
                if not len(batch.labels):
                    continue
                i = len(result.lrs)
                lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
                for group, ratio in zip(optimizer.param_groups, ratios):
                    group["lr"] = lr * ratio
                images, targets = mix(runtime.inputs(batch.images), batch.labels.to(runtime.device))
                _, loss = train_step(model, images, targets, criterion, optimizer, None, runtime, scaler)
                value = float(loss)
                average = SMOOTHING * average + (1 - SMOOTHING) * value
                smooth = average / (1 - SMOOTHING ** (i + 1))
                result.lrs.append(lr)
                result.losses.append(value)
                result.smoothed.append(smooth)
                best = min(best, smooth)
                bar.update(1)
                if not math.isfinite(smooth) or (i > 10 and smooth > DIVERGED * best):
                    result.diverged = True
                    break
                if len(result.lrs) >= steps:
                    break
    finite = [i for i, v in enumerate(result.smoothed) if math.isfinite(v)]
    result.suggestion = suggest_lr([result.lrs[i] for i in finite], [result.smoothed[i] for i in finite])
    _write(result, config)
    if result.suggestion is not None:
        reporter.info(f"suggested learning rate {result.suggestion:.2e}: pass {result.flag} to 'warmstart train' "
                      f"(plot {RunDir(out).lr_find('png')})")
    else:
        reporter.warn(f"no learning rate to suggest: the loss never fell; see {RunDir(out).lr_find('png')}")
    return result


def _write(result: LrFindResult, config: RunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = RunDir(result.out)
    with out.lr_find("csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(result.lrs, result.losses, result.smoothed), start=1):
            writer.writerow([i, *row])
    summary = {k: v for k, v in asdict(result).items() if k in ("suggestion", "diverged")}
    summary.update(flag=result.flag, steps=len(result.lrs), config=config.to_dict())
    out.lr_find("json").write_text(json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggested {result.suggestion:.2e}")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # keep the divergence from flattening the interesting part
        ax.set_ylim(min(finite) * 0.9, min(max(finite), DIVERGED * min(finite)) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate finder: {config.model}, {config.strategy}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RunDir(out).lr_find("png"), dpi=110)
    plt.close(fig)
