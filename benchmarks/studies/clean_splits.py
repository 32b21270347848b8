"""Does the pretrained start help on photos no ImageNet-1k network has seen, and do two further
ways of leaning on the pretrained classifier help there too?

Every other set here holds ImageNet-1k *training* photos, which the classifier has memorised, so a
head that leans harder on it looks better on them whether or not it helps a user's new photos.
Part 1 trains and tests on imagewoof-clean-val alone (200 ImageNet *validation* photos, 20 per
breed): 40 seeded random splits per size, K photos per breed to train on (5, 10), the rest tested.
Part 2 (`--hard-set`) measures the same heads on stanford-dogs-120-dev val (all 25 per class),
the set of #19's 90% target, with features from the runs' cache (.bench-data/prior/cache).

Features: `--recipe best`'s view (1.3x input, whole image) and its mirror (flip TTA). Heads, each
warmstart's LogisticProbe (10 L-BFGS steps):
- the pretrained classifier alone (its rows for the breeds);
- the probe from zero (no prior; weight decay 1e-3, linear-probe's);
- the pretrained start pulled toward it (L2-SP, A = 30: `best` before --head-teacher; the reference);
- the same trained on the mirrored photos too (both views are rows);
- the same with distillation (--head-teacher 0.5: targets half one-hot, half softmax(start logits / T)),
  at T = 2 and at T = 4 (warmstart's TEMPERATURE, chosen on these clean splits: `best` now).

    python -m benchmarks.studies.clean_splits [--hard-set efficientnet_lite0 efficientnet_lite2]
"""

from __future__ import annotations

import argparse

import torch

from warmstart.compute.runtime import Runtime
from warmstart.data.feature_cache import FeatureCache, View
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import data_config_for, eval_transform, mirrored_eval_transform
from warmstart.evaluate import top1
from warmstart.models.create import create_model
from warmstart.models.pretrained_classes import PretrainedStart, imagenet_labels, match_classes
from warmstart.models.tta import combine_views
from warmstart.train.cached import frozen_features
from warmstart.train.probe import fit_probe
from warmstart.train.pull import TEMPERATURE, HeadFit

from ..common import SHARED, save
from ..pretrained_prior import WORK, data_sets

REPEATS, SIZES, PRIOR, SHARE = 40, (5, 10), 30.0, 0.5
HEADS = ("pretrained classifier alone", "probe from zero", "pretrained start, L2-SP",
         "+ mirrored training rows", "+ distillation, T = 2", "+ distillation, T = 4")


def best_features(model_name: str, splits: dict, unmirrored: tuple = ()) -> tuple[dict, PretrainedStart]:
    """Each split's features [views, N, D] in `best`'s view and its mirror (but for `unmirrored`
    splits), through the runs' feature cache; and the pretrained classifier's rows for the classes."""
    model, _, arch = create_model(model_name, 1000, "bundled")
    model.eval()
    runtime = Runtime(torch.device("cpu"))  # fp32, PyTorch
    config = data_config_for(model, None, 1.0, 1.3)
    forward, fingerprint = frozen_features(model, arch, runtime, config["input_size"])
    cache = FeatureCache(WORK / "cache", fingerprint)
    requests = [(View(f"{name}{m}", view(config)), images) for name, images in splits.items()
                for m, view in (("", eval_transform), ("-mirror", mirrored_eval_transform))
                if not (m and name in unmirrored)]
    outs = iter(cache.features_of(requests, forward, runtime, 64, 2))
    features = {}
    for name in splits:
        views = [next(outs)] + ([] if name in unmirrored else [next(outs)])
        features[name] = torch.stack([v.features for v in views]), views[0].labels
    some, labels = next(iter(splits.values())), imagenet_labels("imagenet-1k")
    old = model.get_classifier()
    return features, PretrainedStart.from_old_head(labels, match_classes(some.class_ids, some.class_names, labels),
                                             {"weight": old.weight.detach(), "bias": old.bias.detach()},
                                             torch.nn.Linear(old.in_features, len(some.class_ids)))


def fit(head_name: str, views: torch.Tensor, labels: torch.Tensor, start: PretrainedStart) -> torch.nn.Linear:
    """One of HEADS on training views [V, N, D] (view 0: the photos as they are, view 1: mirrored)."""
    head = torch.nn.Linear(views.shape[-1], len(start.matches))
    pretrained = head_name != "probe from zero"
    with torch.no_grad():
        head.weight.copy_(start.weight if pretrained else 0), head.bias.copy_(start.bias if pretrained else 0)
    if head_name == "pretrained classifier alone":
        return head
    rows = views if head_name == "+ mirrored training rows" else views[:1]
    teacher = "distillation" in head_name
    settings = HeadFit(lr=1.0, weight_decay=1e-3, pull=PRIOR, teacher=SHARE if teacher else 0.0, steps=10,
                       teacher_temperature=float(head_name.split("= ")[1]) if teacher else TEMPERATURE)
    return fit_probe(rows, labels, start if pretrained else None, settings, head=head)


def scored(head: torch.nn.Linear, views: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return top1(combine_views([head(v) for v in views]), labels)


def clean_splits() -> dict:
    clean = resolve_splits(str(SHARED / "imagewoof-clean-val"), 0.0, 0)["train"]
    features, prior = best_features("efficientnet_lite0", {"clean": clean})
    views, labels = features["clean"]
    generator, out = torch.Generator().manual_seed(0), []
    for per_class in SIZES:
        scores = {name: [] for name in HEADS}
        for _ in range(REPEATS):
            order = [torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                                                                         generator=generator)]
                     for c in range(len(prior.matches))]
            train = torch.cat([o[:per_class] for o in order])
            test = torch.cat([o[per_class:] for o in order])
            for name in HEADS:
                head = fit(name, views[:, train], labels[train], prior)
                scores[name].append(scored(head, views[:, test], labels[test]))
        reference = torch.tensor(scores[HEADS[2]])
        for name in HEADS:
            s = torch.tensor(scores[name])
            out.append({"per_class": per_class, "head": name, "mean_top1": float(s.mean()),
                        "vs_reference": float((s - reference).mean()), "wins": int((s > reference).sum()),
                        "losses": int((s < reference).sum())})
            print(out[-1], flush=True)
    return {"model": "efficientnet_lite0", "repeats": REPEATS, "photos": len(labels), "runs": out}


def hard_set(models: list[str]) -> list[dict]:
    _, root, _ = next(s for s in data_sets(False, ("stanford-dogs-120-dev",), (None,)))
    splits = resolve_splits(str(root), 0.2, 0)
    out = []
    for model in models:
        # the mirrored training photos of the larger backbones are not extracted (~16 min for Lite2 here)
        unmirrored = () if model == "efficientnet_lite0" else ("train",)
        features, prior = best_features(model, {"train": splits["train"], "val": splits["val"]}, unmirrored)
        (train, labels), (val, val_labels) = features["train"], features["val"]
        for name in HEADS:
            if name == "+ mirrored training rows" and unmirrored:
                continue
            out.append({"model": model, "head": name, "val_top1": scored(fit(name, train, labels, prior), val,
                                                                         val_labels)})
            print(out[-1], flush=True)
    return out


def run(quick: bool = False, hard: tuple[str, ...] = ()) -> dict:
    result = {"quick": quick, "clean": clean_splits(), "hard_set": hard_set(list(hard)) if hard else []}
    save("clean_splits", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hard-set", nargs="*", default=[], metavar="MODEL")
    run(hard=tuple(parser.parse_args().hard_set))
