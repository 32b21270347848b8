"""The logistic probe: a linear head fitted as an L2-regularised logistic regression on features
held all at once (as scikit-learn's LogisticRegression and CLIP's linear probes do), with L-BFGS
and a strong-Wolfe line search. Training (`--optimizer lbfgs`, one step an epoch), LP-FT's first
stage, the cross-fitted calibration, the label audit and the benchmarks all fit it here, the same
way; its settings are a `HeadFit` (pull.py)."""

from __future__ import annotations

import torch

from ..models.pretrained_classes import PretrainedStart
from .pull import HeadAnchor, HeadFit, teacher_targets


class LogisticProbe:
    """One L-BFGS step (up to 20 iterations) at a time. The penalty is on the mean loss, each row's
    distance from its start (HeadAnchor): from zero, weight_decay/2 x |W|^2; biases are not
    penalised. With a teacher the targets are soft (`teacher_targets`); the correct count is still
    against the labels. `trace`: the objective at each evaluation (the report plots it)."""

    def __init__(self, head, feats: torch.Tensor, labels: torch.Tensor, fit: HeadFit,
                 start: PretrainedStart | None = None, criterion: torch.nn.Module | None = None):
        self.head, self.criterion = head, criterion or torch.nn.CrossEntropyLoss()
        self.anchor = HeadAnchor.of(head, start, fit, len(labels))
        self.x = feats.reshape(-1, feats.shape[-1])  # every stored view is a sample
        self.y = labels.repeat(feats.shape[0])
        self.targets = self.y
        if fit.teacher and start is not None and bool(start.matched.any()):
            self.targets = teacher_targets(self.x, self.y, start, fit.teacher, fit.teacher_temperature)
        self.views = feats.shape[0]
        self.trace: list[float] = []
        self.optimizer = torch.optim.LBFGS(head.parameters(), lr=fit.lr, max_iter=20, history_size=20,
                                           line_search_fn="strong_wolfe")

    def _objective(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.head(self.x), self.targets) + self.anchor.penalty()
        loss.backward()
        self.trace.append(float(loss.detach()))
        return loss

    def step(self) -> tuple[float, int]:
        """One L-BFGS step; after it, the objective it minimises (mean loss + the penalty) and the
        correct count over the training images."""
        self.optimizer.step(self._objective)
        with torch.no_grad():
            logits = self.head(self.x)
            loss = float(self.criterion(logits, self.targets) + self.anchor.penalty())
        return loss, int((logits.argmax(1) == self.y).sum()) // self.views


def fit_probe(features: torch.Tensor, labels: torch.Tensor, start: PretrainedStart | None, fit: HeadFit,
              classes: int | None = None, head: torch.nn.Linear | None = None,
              criterion: torch.nn.Module | None = None) -> torch.nn.Linear:
    """A head fitted for `fit.steps` L-BFGS steps on `features` ([N, D], or [views, N, D]): `head`
    from its current weights, else a new one from the pretrained start's rows (zero elsewhere, and
    everywhere without a start; `classes` then says how many)."""
    features = features if features.ndim == 3 else features[None]
    if head is None:
        classes = len(start.matches) if start is not None else classes
        head = torch.nn.Linear(features.shape[-1], classes).to(features.device)
        with torch.no_grad():
            head.weight.copy_(start.weight if start is not None else torch.zeros_like(head.weight))
            head.bias.copy_(start.bias if start is not None and start.bias is not None else torch.zeros(classes))
    probe = LogisticProbe(head, features, labels, fit, start, criterion)
    head.train()
    for _ in range(fit.steps):
        probe.step()
    return head.eval()
