"""How should the head's rows start for classes the pretrained classifier does not know? Measured
on imagewoof-mini with 3 of its 10 breeds renamed so that they match no ImageNet label (the other
7 start from their pretrained rows): zero (kept), the soft start (the pretrained rows averaged by the
mean old-classifier probabilities of the class's own training photos), and weight imprinting (the
class's mean normalised feature, scaled to the pretrained rows' norm). The head: warmstart's
LogisticProbe with the L2-SP pull (A = 30), on Lite0 features (224 px, center crop), 10 and all
training photos per class; scored on val and on imagewoof-clean-val (overall, and the renamed breeds).

    python -m benchmarks.studies.unmatched_rows
"""

from __future__ import annotations

import torch

from warmstart.data.images import open_image
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import data_config_for, eval_transform
from warmstart.models.create import create_model
from warmstart.models.pretrained_classes import ClassMatch, PretrainedStart, imagenet_labels, match_classes
from warmstart.train.probe import fit_probe
from warmstart.train.pull import HeadFit

from ..common import SHARED, save

HIDDEN = (0, 4, 7)


def _features(model, transform, images) -> dict:
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            x = torch.stack([transform(open_image(p)) for p in images.items[i:i + 64]])
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return {"x": torch.cat(feats), "y": torch.tensor(images.labels)}


def _start(init: str, W0, b0, old, x, y):
    W, b = W0.clone(), b0.clone()
    for c in HIDDEN:
        if init == "zero":
            W[c], b[c] = 0, 0
        elif init == "soft":
            p = (x[y == c] @ old.weight.detach().T + old.bias.detach()).softmax(1).mean(0)
            W[c], b[c] = p @ old.weight.detach(), p @ old.bias.detach()
        else:  # imprinting
            f = torch.nn.functional.normalize(x[y == c], dim=1).mean(0)
            W[c], b[c] = f * W0.norm(dim=1).mean() / f.norm(), b0.mean()
    return W, b


def run(quick: bool = False) -> dict:
    model, _, _ = create_model("efficientnet_lite0", 1000, "bundled")
    model.eval()
    transform = eval_transform(data_config_for(model))
    splits = resolve_splits(str(SHARED / "imagewoof-mini"), 0.2, 0)
    clean = resolve_splits(str(SHARED / "imagewoof-clean-val"), 0.0, 0)["train"]
    data = {name: _features(model, transform, images) for name, images in
            (("train", splits["train"]), ("val", splits["val"]), ("clean", clean))}
    ids = splits["train"].class_ids
    matches = match_classes(ids, splits["train"].class_names, imagenet_labels("imagenet-1k"))
    matches = [ClassMatch(m.class_id, None) if c in HIDDEN else m for c, m in enumerate(matches)]
    old = model.get_classifier()
    rows = [m.row or 0 for m in matches]
    W0, b0 = old.weight.detach()[rows], old.bias.detach()[rows]
    results = []
    for per in (10, None):
        keep = torch.cat([torch.nonzero(data["train"]["y"] == c).flatten()[:per] for c in range(len(ids))])
        x, y = data["train"]["x"][keep], data["train"]["y"][keep]
        for init in ("zero", "soft", "imprint"):
            W, b = _start(init, W0, b0, old, x, y)
            head = torch.nn.Linear(x.shape[1], len(ids))
            with torch.no_grad():
                head.weight.copy_(W), head.bias.copy_(b)
            fit_probe(x, y, PretrainedStart("imagenet-1k", matches, W.clone(), b.clone()),
                      HeadFit(lr=1.0, weight_decay=1e-3, pull=30.0, steps=10), head=head)
            row = {"per_class": per, "start": init}
            with torch.no_grad():
                for split in ("val", "clean"):
                    pred, truth = head(data[split]["x"]).argmax(1), data[split]["y"]
                    hidden = torch.isin(truth, torch.tensor(HIDDEN))
                    row[f"{split}_top1"] = float((pred == truth).float().mean())
                    row[f"{split}_renamed_top1"] = float((pred[hidden] == truth[hidden]).float().mean())
            results.append(row)
            print(row, flush=True)
    result = {"quick": quick, "hidden_classes": [ids[c] for c in HIDDEN], "runs": results}
    save("unmatched_rows", result)
    return result


if __name__ == "__main__":
    run()
