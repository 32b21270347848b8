"""Probabilities a user can trust: the expected calibration error (15 equal-width confidence
bins, the one ECE everywhere), the negative log-likelihood, and temperature scaling (Guo et al.,
2017): one scalar T fitted on held-out logits, probabilities softmax(logits / T). T cannot change
which class is on top, only how sure the model says it is.

The held-out logits are val's, or (`--calibration-fit cross-fit`, a head on cached features with
few val photos) each train and val photo's logits from a head fitted without it (train/cross_fit.py):
on 10 breeds with 20 val photos, val alone left T at its bound on 4 of 6 runs and the test ECE of
photos no network saw at 0.058-0.069; cross-fitted, BENCHMARKS.md §11b.

A T the photos do not determine is not used: where every one is classified correctly the
likelihood grows without end as T -> 0 (val alone then put T at its bound, e^-3)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import Diverged

BINS = 15
LOG_T_BOUND = 3.0  # a fitted T lies in [e^-3, e^3], about [0.0498, 20.1]
TEMPERATURE_BOUNDS = (math.exp(-LOG_T_BOUND) * (1 - 1e-6), math.exp(LOG_T_BOUND) * (1 + 1e-6))  # float32 rounding
MIN_PHOTOS = 20  # fewer held-out photos determine no temperature: on 1-2 the fit runs to its bound
FITTED_ON = ("val", "cross-fit")  # where a temperature's logits came from (model.json says which)


def reliability(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict:
    """The expected calibration error of softmax(logits) and its bins (count, accuracy, mean
    confidence): |accuracy - confidence| per bin, weighted by the bin's share of the images."""
    if not len(labels):
        return {"ece": 0.0, "bins": []}
    confidence, predicted = logits.float().softmax(1).max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.clamp(torch.bucketize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += float(mask.float().mean()) * abs(acc - conf)
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                          "accuracy": acc, "confidence": conf})
    return {"ece": ece, "bins": table}


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    return reliability(logits, labels, bins)["ece"]


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float(), labels)) if len(labels) else 0.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The T > 0 minimising the NLL of softmax(logits / T) (L-BFGS on log T, from T = 1); None where
    the photos do not determine it: every one classified correctly (the NLL then falls toward 0 as
    T -> 0, without a minimum), or the optimum at the bound [e^-3, e^3]."""
    if bool((logits.argmax(1) == labels).all()):
        return None
    with torch.inference_mode(False), torch.enable_grad():  # logits may come from inference mode
        logits, labels = logits.detach().float().clone(), labels.clone()
        log_t = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def objective():
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.clamp(-LOG_T_BOUND, LOG_T_BOUND).exp(), labels)
            loss.backward()
            return loss

        optimizer.step(objective)
    fitted = float(log_t.detach())
    return None if abs(fitted) >= LOG_T_BOUND * 0.999 else math.exp(fitted)


@dataclass
class Calibration:
    """A fitted temperature and what it did on the logits it was fitted on (`fitted_on`: val's, or
    the cross-fitted out-of-fold logits of train + val)."""

    temperature: float
    images: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    fitted_on: str = "val"
    determined: bool = True  # False: the fit ran to its bound, T kept at 1

    @classmethod
    def fit(cls, logits: torch.Tensor, labels: torch.Tensor, fitted_on: str = "val") -> "Calibration":
        """The temperature, kept only where it makes those probabilities more honest (ECE): on a
        handful of images, or a head that barely learned, the NLL's optimum can be extreme; below
        MIN_PHOTOS images none is fitted, nor where the fit runs to its bound."""
        if not bool(torch.isfinite(logits).all()):
            raise Diverged("the model's validation outputs are not finite (training diverged): no model was saved; "
                           "lower --lr or --head-prior")
        fitted = fit_temperature(logits, labels) if len(labels) >= MIN_PHOTOS else 1.0
        t = 1.0 if fitted is None else fitted
        if expected_calibration_error(logits / t, labels) > expected_calibration_error(logits, labels):
            t = 1.0
        return cls(t, len(labels), expected_calibration_error(logits, labels),
                   expected_calibration_error(logits / t, labels), negative_log_likelihood(logits, labels),
                   negative_log_likelihood(logits / t, labels), fitted_on, fitted is not None)

    def line(self) -> str:
        where = "val images" if self.fitted_on == "val" else "train + val images (cross-fitted, out of fold)"
        if self.images < MIN_PHOTOS:
            return (f"warning: calibration: {self.images} {where} are too few to fit a temperature (at least "
                    f"{MIN_PHOTOS}): the probabilities are kept as they are")
        if not self.determined:
            return (f"warning: calibration: the {self.images} {where} do not determine a temperature (every one is "
                    f"classified correctly: the sharper the better, without end): the probabilities are kept as they are; "
                    f"more validation photos would calibrate them")
        if self.temperature == 1.0:
            return (f"calibration: no temperature made the probabilities of {self.images} {where} more honest "
                    f"(ECE {self.ece_before:.3f}): kept as they are")
        return (f"calibration: temperature {self.temperature:.3f} fitted on {self.images} {where}: ECE "
                f"{self.ece_before:.3f} -> {self.ece_after:.3f}, NLL {self.nll_before:.3f} -> {self.nll_after:.3f}")

    def to_dict(self) -> dict:
        return asdict(self)
