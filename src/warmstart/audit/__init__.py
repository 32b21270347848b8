"""`warmstart data audit ROOT`: what is wrong with the labels, before training. One extraction of
the frozen network's features (into the same cache `train` uses), then seconds of analysis
(audit/find.py); written as CSV files and a self-contained HTML page (audit/write.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import UserError
from ..progress import Reporter
from ..train.probe import fit_probe
from ..train.pull import HeadFit
from . import find
from .write import write_audit

SPLITS = ("train", "val", "test")


@dataclass
class AuditResult:
    out: Path
    photos: int
    label_issues: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    duplicate_groups: list[dict] = field(default_factory=list)  # one row per member of a group of 3 or more
    outliers: list[dict] = field(default_factory=list)

    @property
    def leaks(self) -> list[dict]:
        return [d for d in self.duplicates if d["split_a"] != d["split_b"]]

    def summary(self) -> str:
        worst = {}
        for issue in self.label_issues:
            worst[issue["label"]] = worst.get(issue["label"], 0) + 1
        classes = ", ".join(f"{name} ({n})" for name, n in sorted(worst.items(), key=lambda kv: -kv[1])[:5])
        return (f"audit of {self.photos:,} photos: {len(self.label_issues)} likely label errors"
                f"{f' (most in {classes})' if classes else ''}, {len(self.duplicates)} near-duplicate pairs "
                f"({len(self.leaks)} across splits: leakage; {self.groups} groups of 3 or more), {len(self.outliers)} "
                f"outliers; details in {self.out}")

    @property
    def groups(self) -> int:
        return len({row["group"] for row in self.duplicate_groups})


def features_of(config: RunConfig, reporter: Reporter):
    """(splits, {split: features}, built): the frozen network's pooled features of every split's
    un-augmented view, from the cache a training run with this config and --cache-dir reads."""
    from ..compute.runtime import Runtime
    from ..data.feature_cache import FeatureCache, View
    from ..data.transforms import eval_transform
    from ..train.cached import cached_views, frozen_features
    from ..train.run import build
    from ..train.session import Session

    built = build(config, reporter)
    runtime = Runtime.for_config(config)
    model = runtime.prepare(built.model.eval())
    session = Session(config, built.data_config, runtime, reporter)
    reporter.info(runtime.engine_line())
    forward, fingerprint = frozen_features(model, built.arch, runtime, built.data_config["input_size"], reporter.info,
                                           sum(len(s) for s in built.splits.values()))
    cache = FeatureCache(config.cache_dir, fingerprint, reporter.warn)
    names = [s for s in SPLITS if s in built.splits and len(built.splits[s])]
    outs = cached_views(cache, [(View(s, eval_transform(built.data_config)), built.splits[s]) for s in names],
                        forward, session)
    for item, reason in sorted({s for out in outs for s in out.skipped}):
        reporter.warn(f"skipped {item}: {reason} (left out of the audit)")
    return {s: built.splits[s] for s in names}, dict(zip(names, outs)), built


def audit(config: RunConfig, reporter: Reporter | None = None,
          similarity: float = find.DUPLICATE_SIMILARITY) -> AuditResult:
    """Audit config.data with config's model and data options; results in config.out (default
    audit/), features in config.cache_dir (default OUT/cache)."""
    reporter = reporter or Reporter(config.quiet)
    out = Path(config.out or "audit")
    data = Path(config.data)
    if data.is_dir() and (out.resolve() == data.resolve() or data.resolve() in out.resolve().parents):
        raise UserError(f"--out {out} is inside the data ({config.data}): its CSVs and cache would become part of the "
                        f"data; write the audit elsewhere")
    config = config.replace(cache_dir=config.cache_dir or str(out / "cache")).validated()
    # the head as --recipe linear-probe fits it, with the run's --head-prior; the labels alone: soft
    # targets from the pretrained classifier would hide where labels disagree with it
    probe = HeadFit.linear_probe(config.head_prior)
    splits, outs, built = features_of(config, reporter)
    rows = {s: torch.nonzero(o.valid).flatten() for s, o in outs.items()}  # unreadable photos left out
    feats = {s: outs[s].features[rows[s]].float() for s in splits}
    labels = {s: torch.as_tensor(splits[s].labels)[rows[s]] for s in splits}
    classes = len(splits["train"].class_ids)
    result = AuditResult(out, sum(len(r) for r in rows.values()))
    probs = {"train": find.out_of_fold(feats["train"], labels["train"], classes, probe, built.pretrained, seed=config.seed)}
    head = fit_probe(feats["train"], labels["train"], built.pretrained, probe, classes)
    probs.update({s: find.probabilities(head, feats[s]) for s in splits if s != "train"})
    names = splits["train"].class_names

    def photo(split: str, row: int) -> dict:
        index = int(rows[split][row])
        item = splits[split].items[index]  # kept beside its name: a shard's sample is read through it
        return {"path": str(item), "item": item, "split": split, "label": names[splits[split].labels[index]]}

    for s in splits:
        result.label_issues += [{**photo(s, i), "suggested": names[suggested], "score": round(quality, 4)}
                                for i, suggested, quality in find.label_issues(labels[s].numpy(), probs[s])]
    result.label_issues.sort(key=lambda r: r["score"])
    photos = [photo(s, i) for s in splits for i in range(len(rows[s]))]  # in the order of `everything`
    everything = torch.cat([feats[s] for s in splits])
    pairs = {(a, b): sim for a, b, sim in find.near_duplicates(everything, similarity)}
    pairs.update({(a, b): 1.0 for a, b in find.identical_files([p["item"] for p in photos])})
    for (a, b), sim in sorted(pairs.items(), key=lambda kv: -kv[1]):
        first, second = photos[a], photos[b]
        result.duplicates.append({"path_a": first["path"], "path_b": second["path"], "item_a": first["item"],
                                  "item_b": second["item"], "split_a": first["split"],
                                  "split_b": second["split"], "label_a": first["label"], "label_b": second["label"],
                                  "similarity": round(sim, 4)})
    groups = find.duplicate_groups(len(photos), list(pairs))
    result.duplicate_groups = [{"group": g + 1, "size": len(members), **photos[i]}
                               for g, members in enumerate(groups) for i in members]
    scores = find.outlier_scores(everything, groups=groups)
    result.outliers = [{**photos[i], "score": round(float(scores[i]), 4)}
                       for i in find.flagged_outliers(scores, groups=groups)]
    write_audit(result)
    reporter.info(result.summary())
    return result
