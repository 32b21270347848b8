"""Which classes the pretrained classifier knows, and the new head's start from it.

The label set of the weights in use (ImageNet-1k, -12k, -22k … as timm records them, or a file
with one label per line), the user's classes matched to its rows by WordNet id or by name (and
synonyms), and `PretrainedStart`: the new head's starting rows (the old classifier's rows of matched
classes, zero elsewhere) that training is pulled back toward (L2-SP).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, excerpt
from ..files import load_yaml

IMAGENET_SETS = ("imagenet-1k", "imagenet-12k", "imagenet-22k", "imagenet-22k-ms", "imagenet-21k-goog",
                 "imagenet-21k-miil")
_WNID = re.compile(r"^(n\d{8})(?:$|[-_\s,:]+(.*)$)")


def normalise(name: str) -> str:
    """Names compare ignoring case, spaces, `_` and `-`."""
    return re.sub(r"[\s_\-]+", "", name).lower()


@dataclass(frozen=True)
class LabelSet:
    """The classifier's rows: a WordNet id per row where known (else ""), and its names."""

    name: str
    ids: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.names)

    def row_of_id(self) -> dict[str, int]:
        return {wnid: row for row, wnid in enumerate(self.ids) if wnid}

    def rows_of_name(self) -> dict[str, list[int]]:
        """Each normalised name or synonym -> the rows that carry it."""
        index: dict[str, list[int]] = {}
        for row, names in enumerate(self.names):
            for key in {normalise(n) for n in names if n.strip()}:
                index.setdefault(key, []).append(row)
        return index

    def describe(self, row: int) -> str:
        return self.names[row][0] if self.names[row] else self.ids[row]


def imagenet_labels(subset: str) -> LabelSet:
    """An ImageNet label set from timm's own lists (WordNet ids and their lemmas)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo(subset)
    ids = tuple(info.label_names())
    return LabelSet(subset, ids, tuple(tuple(n.strip() for n in info.label_name_to_description(i).split(","))
                                       for i in ids))


def labels_from_file(path: str | Path) -> LabelSet:
    """One label per line, in the classifier's row order: a WordNet id, names (comma-separated
    synonyms), or a WordNet id followed by its names."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8-sig").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--pretrained-labels {path}: not a readable UTF-8 text file ({exc.__class__.__name__}): "
                        f"pass one of {', '.join(IMAGENET_SETS)} or a file with one label per line") from None
    ids, names = [], []
    for line in lines:
        match = _WNID.match(line.strip())
        ids.append(match.group(1) if match else "")
        rest = (match.group(2) or "") if match else line
        names.append(tuple(n.strip() for n in rest.split(",") if n.strip()))
    return LabelSet(str(path), tuple(ids), tuple(names))


def label_set(spec: str) -> LabelSet:
    """`--pretrained-labels`: an ImageNet subset's name, or a file."""
    if normalise(spec) in {normalise(s) for s in IMAGENET_SETS}:
        return imagenet_labels(spec)
    if not Path(spec).expanduser().is_file():
        raise UserError(f"--pretrained-labels {spec!r} is neither a label set ({', '.join(IMAGENET_SETS)}) nor a "
                        f"file: pass one of those, or a text file with one label per line")
    return labels_from_file(spec)


def labels_of_weights(weights: str, pretrained_cfg: dict, given: str | None) -> LabelSet | None:
    """The label set of the weights in use: given (`--pretrained-labels`), ImageNet-1k for the
    bundled weights, what timm records for hub weights; None for a file without it, or `none`."""
    if given:
        return label_set(given)
    if weights == "bundled":
        return imagenet_labels("imagenet-1k")
    if weights == "hub":
        from timm.data import infer_imagenet_subset

        subset = infer_imagenet_subset(pretrained_cfg)
        return imagenet_labels(subset) if subset else None
    return None


@dataclass(frozen=True)
class ClassMatch:
    """A user class and the pretrained row it starts from (None: from zero), and how it matched."""

    class_id: str
    row: int | None
    label: str = ""
    how: str = "no match"

    def to_dict(self) -> dict:
        return {"class": self.class_id, "row": self.row, "label": self.label, "how": self.how}


def _candidates(class_id: str, class_name: str) -> tuple[str | None, list[str]]:
    """A class's WordNet id (from `n02085620-Chihuahua` or a bare `n02099601`) and its names."""
    match = _WNID.match(class_id.strip())
    names = [(match.group(2) or "") if match else class_id, class_name]
    return (match.group(1) if match else None), [n for n in dict.fromkeys(names) if n and normalise(n)]


def match_classes(class_ids: list[str], class_names: list[str], labels: LabelSet,
                  class_map: dict[str, int | None] | None = None) -> list[ClassMatch]:
    """Each class's pretrained row: the class map's word first, then the WordNet id, then a name
    or synonym that fits exactly one row. A row two classes would share starts neither."""
    by_id, by_name, class_map = labels.row_of_id(), labels.rows_of_name(), class_map or {}
    found = []
    for class_id, class_name in zip(class_ids, class_names):
        if class_id in class_map:
            row = class_map[class_id]
            found.append(ClassMatch(class_id, row, labels.describe(row) if row is not None else "",
                                    "class map" if row is not None else "class map: none"))
            continue
        wnid, names = _candidates(class_id, class_name)
        if wnid in by_id:
            found.append(ClassMatch(class_id, by_id[wnid], labels.describe(by_id[wnid]), "WordNet id"))
            continue
        rows = sorted({r for n in names for r in by_name.get(normalise(n), [])})
        if len(rows) == 1:
            found.append(ClassMatch(class_id, rows[0], labels.describe(rows[0]), "name"))
        elif rows:
            found.append(ClassMatch(class_id, None, "", "ambiguous: " + " / ".join(labels.describe(r)
                                                                                     for r in rows[:4])))
        else:
            found.append(ClassMatch(class_id, None))
    return _unshared(found, labels)


def _unshared(found: list[ClassMatch], labels: LabelSet) -> list[ClassMatch]:
    rows = [m.row for m in found if m.row is not None]
    shared = {r for r in rows if rows.count(r) > 1}
    return [ClassMatch(m.class_id, None, "", f"ambiguous: {labels.describe(m.row)} fits several classes")
            if m.row in shared else m for m in found]


def read_class_map(path: str | Path, class_ids: list[str], class_names: list[str],
                   labels: LabelSet) -> dict[str, int | None]:
    """`--class-map FILE` (YAML mapping or CSV `class,label`): class (id or readable name) ->
    WordNet id, label name, or `none`. An unknown class or label is one line."""
    path = Path(path).expanduser()
    entries = _read_map_entries(path)
    by_name = {n: c for c, n in zip(class_ids, class_names)}
    by_id, by_label = labels.row_of_id(), labels.rows_of_name()
    resolved: dict[str, int | None] = {}
    for key, value in entries.items():
        class_id = key if key in class_ids else by_name.get(key)
        if class_id is None:
            raise UserError(f"--class-map {path}: {excerpt(key)} is not one of the data's classes "
                            f"(e.g. {', '.join(class_ids[:3])}): fix the entry or remove it")
        word = "" if value is None else str(value).strip()
        if normalise(word) in ("", "none", "null"):
            resolved[class_id] = None
        elif word in by_id:
            resolved[class_id] = by_id[word]
        elif len(by_label.get(normalise(word), [])) == 1:
            resolved[class_id] = by_label[normalise(word)][0]
        else:
            rows = by_label.get(normalise(word), [])
            why = (f"names several labels ({', '.join(labels.ids[r] or labels.describe(r) for r in rows[:4])}): "
                   f"use the WordNet id") if rows else f"is not a label of {labels.name}"
            raise UserError(f"--class-map {path}: {excerpt(key)}: {excerpt(word)} {why}")
    return resolved


def _read_map_entries(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise UserError(f"--class-map {path} does not exist: pass a YAML or CSV file of class -> label")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--class-map {path} is not readable UTF-8 text ({exc.__class__.__name__})") from None
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["class", "label"]:
            rows = rows[1:]
        if any(len(r) < 2 for r in rows):
            raise UserError(f"--class-map {path}: every row must be 'class,label'")
        return {r[0].strip(): r[1].strip() for r in rows}
    import yaml

    try:
        values = load_yaml(text, f"--class-map {path}")
    except yaml.YAMLError as exc:
        raise UserError(f"--class-map {path} is neither a CSV (.csv) nor valid YAML ({exc.__class__.__name__})") \
            from None
    if not isinstance(values, dict):
        raise UserError(f"--class-map {path} must hold a mapping of class: label")
    return {str(k): v for k, v in values.items()}


@dataclass
class PretrainedStart:
    """The new head's start: the old classifier's rows for matched classes, zero elsewhere."""

    labels: str
    matches: list[ClassMatch]
    weight: torch.Tensor  # [classes, ...] as the new head's weight
    bias: torch.Tensor | None

    @property
    def matched(self) -> torch.Tensor:
        return torch.tensor([m.row is not None for m in self.matches])

    @classmethod
    def from_old_head(cls, labels: LabelSet, matches: list[ClassMatch], old: dict[str, torch.Tensor],
                      head: torch.nn.Module) -> "PretrainedStart":
        """Rows of the old classifier's weight and bias (`old`: the source tensors of the head)."""
        old_weight = old.get("weight")
        if old_weight is None or old_weight.shape[0] != len(labels) or old_weight.shape[1:] != head.weight.shape[1:]:
            shape = None if old_weight is None else tuple(old_weight.shape)
            raise UserError(f"the pretrained classifier (shape {shape}) does not fit the label set {labels.name} "
                            f"({len(labels)} labels) and this head: pass the right --pretrained-labels, or "
                            f"--head-init zero")
        weight = torch.zeros_like(head.weight, dtype=torch.float32)
        bias = torch.zeros(weight.shape[0]) if getattr(head, "bias", None) is not None else None
        for c, match in enumerate(matches):
            if match.row is not None:
                weight[c] = old_weight[match.row].float()
                if bias is not None and old.get("bias") is not None:
                    bias[c] = old["bias"][match.row].float()
        return cls(labels.name, matches, weight, bias)

    def apply(self, head: torch.nn.Module) -> None:
        with torch.no_grad():
            head.weight.copy_(self.weight)
            if self.bias is not None:
                head.bias.copy_(self.bias)

    def summary(self) -> str:
        known = [m for m in self.matches if m.row is not None]
        if not known:
            return (f"pretrained classifier ({self.labels}) knows none of the {len(self.matches)} classes: the head "
                    f"starts from zero (--class-map FILE names classes it knows under other names)")
        how = sorted({m.how for m in known})
        others = [m.class_id for m in self.matches if m.row is None]
        line = (f"pretrained classifier ({self.labels}) knows {len(known)} of {len(self.matches)} classes"
                f"{' (by ' + ', '.join(how) + ')' if how else ''}")
        if others:
            shown = ", ".join(others[:8]) + (" …" if len(others) > 8 else "")
            line += f"; the other {len(others)} start{'s' if len(others) == 1 else ''} from zero: {shown}"
        return line


def pretrained_start_for(model: torch.nn.Module, old_head: dict, class_ids: list[str], class_names: list[str],
                   settings) -> PretrainedStart | None:
    """The head's start as the settings say (`settings`: head_init, weights, pretrained_labels,
    class_map): the pretrained classifier's rows for the classes its label set knows (put in
    `model`'s head), or None: every row from zero. A PretrainedStart with no matched row says so."""
    required = settings.head_init == "pretrained"
    if settings.head_init == "zero":
        return None
    labels = labels_of_weights(settings.weights, getattr(model, "pretrained_cfg", {}), settings.pretrained_labels)
    if labels is None or not old_head:
        if required:
            why = (f"the label set of --weights {settings.weights} is not known: pass --pretrained-labels SET|FILE"
                   if labels is None else "the weights hold no classifier to start from (or it was restored as is)")
            raise UserError(f"--head-init pretrained: {why}, or use --head-init zero")
        return None
    class_map = read_class_map(settings.class_map, class_ids, class_names, labels) if settings.class_map else None
    prior = PretrainedStart.from_old_head(labels, match_classes(class_ids, class_names, labels, class_map), old_head,
                                    model.get_classifier())
    if required and not bool(prior.matched.any()):
        raise UserError(f"--head-init pretrained: none of the classes matches a label of {labels.name}: name them "
                        f"in a --class-map FILE, or use --head-init auto or zero")
    if prior.matched.any():
        prior.apply(model.get_classifier())
    return prior
