"""Keeping what the pretrained network knows: the classes its classifier knows (by WordNet id, name
or synonym, or a class map), the new head started from its rows and pulled back toward them
(L2-SP), the pretrained classifier alone as epoch 0 (--epochs 0, --keep-best on every path)."""

import json
from types import SimpleNamespace

import pytest
import torch

from warmstart import RunConfig, train
from warmstart.errors import UserError
from warmstart.models.create import create_model
from warmstart.models.pretrained_classes import (PretrainedStart, pretrained_start_for, imagenet_labels, label_set,
                                                 match_classes, read_class_map)
from warmstart.train.probe import fit_probe
from warmstart.train.pull import TEMPERATURE, AnchoredLoss, HeadAnchor, HeadFit, teacher_targets

from conftest import require_shared

FAST = dict(workers=0, quiet=True)


@pytest.fixture(scope="module")
def in1k():
    return imagenet_labels("imagenet-1k")


def _rows(matches):
    return [m.row for m in matches]


def test_classes_match_by_wordnet_id_name_and_synonym(in1k):
    ids = ["n02085620-Chihuahua", "n02099601", "golden_retriever", "Maltese", "German Shepherd Dog", "Shih-Tzu",
           "0", "n11111111-Samoyed"]
    names = ["Chihuahua", "golden retriever", "golden_retriever", "Maltese", "German Shepherd Dog", "Shih-Tzu",
             "0", "Samoyed"]
    found = match_classes(ids[:2] + ids[3:], names[:2] + names[3:], in1k)
    assert [(m.row, m.how) for m in found] == [
        (151, "WordNet id"), (207, "WordNet id"), (153, "name"),  # "Maltese" is a synonym of "Maltese dog"
        (235, "name"), (155, "name"), (None, "no match"), (258, "name")]  # an unknown id falls back to its name
    assert in1k.ids[151] == "n02085620" and in1k.ids[258] == "n02111889"


def test_an_ambiguous_name_matches_neither_and_says_why(in1k):
    crane, = match_classes(["crane"], ["crane"], in1k)  # the bird and the machine
    assert crane.row is None and crane.how.startswith("ambiguous: crane / crane")
    # two classes that would start from the same row: neither does
    found = match_classes(["n02099601", "golden retriever"], ["golden retriever", "golden retriever"], in1k)
    assert _rows(found) == [None, None] and all("fits several classes" in m.how for m in found)


def test_a_class_map_settles_the_rest_and_its_mistakes_are_one_line(in1k, tmp_path):
    ids, names = ["doggo", "kitty", "crane", "other"], ["doggo", "kitty", "crane", "other"]
    yaml_map = tmp_path / "map.yaml"
    yaml_map.write_text("doggo: n02099601\nkitty: tabby cat\ncrane: n02012849\nother: none\n")
    class_map = read_class_map(yaml_map, ids, names, in1k)
    assert [m.how for m in match_classes(ids, names, in1k, class_map)] == ["class map"] * 3 + ["class map: none"]
    assert _rows(match_classes(ids, names, in1k, class_map)) == [207, 281, 134, None]
    csv_map = tmp_path / "map.csv"
    csv_map.write_text("class,label\ndoggo,golden retriever\n")
    assert read_class_map(csv_map, ids, names, in1k) == {"doggo": 207}
    for text, message in [("cat: n02123045\n", "'cat' is not one of the data's classes"),
                          ("doggo: n99999999\n", "is not a label of imagenet-1k"),
                          ("doggo: crane\n", "names several labels (n02012849, n03126707): use the WordNet id"),
                          ("- a\n- b\n", "must hold a mapping")]:
        yaml_map.write_text(text)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_class_map(yaml_map, ids, names, in1k)


def test_a_label_file_and_the_imagenet_sets_are_label_sets(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("n02099601 golden retriever\nbeagle\nn02085620\nred panda, lesser panda\n")
    labels = label_set(str(path))
    assert labels.ids == ("n02099601", "", "n02085620", "")
    assert _rows(match_classes(["golden-retriever", "Beagle", "n02085620-x", "lesser_panda"],
                               ["", "", "", ""], labels)) == [0, 1, 2, 3]
    assert len(label_set("imagenet-22k")) == 21841 and len(label_set("ImageNet_1k")) == 1000
    with pytest.raises(UserError, match="neither a label set"):
        label_set("imagenet-5k")


def _dog_classes():
    return ["n02085620-Chihuahua", "n99999999-not_a_class", "n02099601-golden_retriever"]


def test_the_starting_head_reproduces_the_pretrained_logits_of_matched_classes():
    settings = SimpleNamespace(head_init="auto", weights="bundled", pretrained_labels=None, class_map=None)
    pretrained, _, _ = create_model("efficientnet_lite0", 1000, "bundled")
    model, report, _ = create_model("efficientnet_lite0", 3, "bundled")
    prior = pretrained_start_for(model, report.old_head, _dog_classes(), ["Chihuahua", "not a class", "golden retriever"],
                           settings)
    assert prior.matched.tolist() == [True, False, True]
    assert prior.summary() == ("pretrained classifier (imagenet-1k) knows 2 of 3 classes (by WordNet id); the other "
                               "1 starts from zero: n99999999-not_a_class")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = pretrained.eval().forward_head(pretrained.forward_features(x), pre_logits=True)
        old, new = pretrained.get_classifier()(features), model.eval().get_classifier()(features)
    assert torch.allclose(new[:, 0], old[:, 151], atol=1e-5) and torch.allclose(new[:, 2], old[:, 207], atol=1e-5)
    assert torch.equal(model.get_classifier().weight[0], pretrained.get_classifier().weight[151])
    assert torch.equal(new[:, 1], torch.zeros(2))  # unmatched: zero weight and bias
    zero, report, _ = create_model("efficientnet_lite0", 3, "bundled")
    assert pretrained_start_for(zero, report.old_head, _dog_classes(), ["a", "b", "c"],
                          SimpleNamespace(**{**vars(settings), "head_init": "zero"})) is None
    assert not zero.get_classifier().weight.any()


def test_head_init_pretrained_says_what_is_missing(tmp_path):
    model, report, _ = create_model("efficientnet_lite0", 2, "bundled")
    required = SimpleNamespace(head_init="pretrained", weights="bundled", pretrained_labels=None, class_map=None)
    with pytest.raises(UserError, match="none of the classes matches a label of imagenet-1k"):
        pretrained_start_for(model, report.old_head, ["0", "1"], ["0", "1"], required)
    with pytest.raises(UserError, match="label set of --weights w.pth is not known: pass --pretrained-labels"):
        pretrained_start_for(model, report.old_head, ["0", "1"], ["0", "1"], SimpleNamespace(**{**vars(required),
                                                                                         "weights": "w.pth"}))


def _prior(head, matched_rows: int = 2):
    weight = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1))
    weight[matched_rows:] = 0
    matches = [SimpleNamespace(row=0 if c < matched_rows else None) for c in range(len(weight))]
    return PretrainedStart("test", matches, weight, torch.zeros(len(weight)))


def test_l2_sp_pulls_the_head_toward_its_start():
    """A strong pull returns the start for matched rows; rows from zero keep the plain L2 penalty;
    without a prior the probe is the plain regression."""
    torch.manual_seed(0)
    x, y = torch.randn(60, 8), torch.randint(0, 3, (60,))
    distances = {}  # 60 images: 1e6 is 1.7e4 on the mean loss
    for strength in (0.0, 1e6):
        head = torch.nn.Linear(8, 3)
        prior = _prior(head)
        prior.apply(head)
        fit_probe(x, y, prior, HeadFit(lr=1.0, weight_decay=1e-3, pull=strength, steps=5), head=head)
        distances[strength] = float((head.weight[:2] - prior.weight[:2]).abs().max().detach())
    assert distances[1e6] < 1e-3 < distances[0.0]
    # the penalty itself: each row's strength times its squared distance from its start, halved
    head = torch.nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.fill_(1.0)
    prior = _prior(head)
    anchor = HeadAnchor.of(head, prior, HeadFit(pull=20.0, weight_decay=0.5), images=10)
    expected = 0.5 * (2.0 * (1 - prior.weight[:2]).pow(2).sum() + 0.5 * 8)  # 20 / 10 images on the mean loss
    assert torch.allclose(anchor.penalty(), expected)
    loss = AnchoredLoss(torch.nn.CrossEntropyLoss(), anchor)(head(x), y)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(head(x), y) + expected)


def test_the_teacher_targets_mix_the_label_with_the_classifier_among_the_classes_it_knows():
    """Photos of known classes: (1 - share) x one-hot + share x softmax(start logits / T) over the
    known classes only; photos of classes the classifier does not know keep their one-hot label."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    prior = _prior(head)  # classes 0 and 1 known, 2 not
    prior.bias = torch.tensor([0.5, -0.5, 0.0])
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    targets = teacher_targets(x, y, prior, 0.25)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    soft = ((x @ prior.weight[:2].T + prior.bias[:2]) / TEMPERATURE).softmax(1)
    known = y < 2
    expected = 0.75 * torch.nn.functional.one_hot(y[known], 3).float()
    expected[:, :2] += 0.25 * soft[known]
    assert torch.allclose(targets[known], expected)
    assert torch.equal(targets[~known], torch.nn.functional.one_hot(y[~known], 3).float())


def test_the_probe_distils_the_classifier_only_when_asked_and_only_with_lbfgs():
    """With labels that all contradict the pretrained classifier and no pull: --head-teacher 1 fits
    the head to the classifier's softened predictions (it agrees with the classifier), 0 to the
    labels (it disagrees). Another optimizer is one clear line."""
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    teacher = (x @ _prior(torch.nn.Linear(8, 3)).weight[:2].T).argmax(1)
    y = 1 - teacher  # every label contradicts the classifier
    agreement = {}
    for share in (0.0, 1.0):
        head = torch.nn.Linear(8, 3)
        prior = _prior(head)
        prior.apply(head)
        fit_probe(x, y, prior, HeadFit(lr=1.0, weight_decay=1e-3, pull=0.0, teacher=share, steps=5), head=head)
        with torch.no_grad():
            agreement[share] = float((head(x).argmax(1) == teacher).float().mean())
    assert agreement[1.0] > 0.95 and agreement[0.0] < 0.05
    with pytest.raises(UserError, match="--head-teacher 0.5 .* --optimizer lbfgs"):
        RunConfig(data="x", optimizer="adamw", head_teacher=0.5).validated()


@pytest.fixture
def dogs(tmp_path):
    """Four Stanford Dogs breeds (ImageNet classes, named by WordNet id) in train/ and val/."""
    source = require_shared("stanford-dogs-4breeds") / "Images"
    root = tmp_path / "dogs"
    for breed in sorted(source.iterdir()):
        photos = sorted(breed.glob("*.jpg"))
        for split, chosen in (("train", photos[:6]), ("val", photos[6:11])):
            (root / split / breed.name).mkdir(parents=True)
            for photo in chosen:
                (root / split / breed.name / photo.name).symlink_to(photo)
    return root


@pytest.mark.slow
def test_epochs_0_saves_the_pretrained_classifier_as_a_run_every_command_uses(dogs, tmp_path, capsys):
    from warmstart.cli import main

    out = tmp_path / "zero-shot"
    result = train(RunConfig(data=str(dogs), epochs=0, augment="none", out=str(out), **FAST))
    log = capsys.readouterr().out
    assert "pretrained classifier (imagenet-1k) knows 4 of 4 classes (by WordNet id)" in log
    assert "pretrained classifier alone: val top-1" in log
    assert result.metrics["head_start"]["classes_matched"] == 4
    assert result.metrics["top1"] == result.metrics["head_start"]["val_top1"] >= 0.9
    report = json.loads((out / "restore_report.json").read_text())
    assert report["pretrained_labels"] == "imagenet-1k"
    assert report["classes"][0] == {"class": "n02085936-Maltese_dog", "row": 153, "label": "Maltese dog",
                                    "how": "WordNet id"}
    photo = next((dogs / "val" / "n02099601-golden_retriever").iterdir())
    for argv in (["eval", str(out)], ["predict", str(out), str(photo)], ["report", str(out)],
                 ["export", str(out), "--format", "onnx"]):
        assert main(argv) == 0, argv
    assert "golden retriever" in capsys.readouterr().out  # predict's top class
    assert (out / "model.onnx").is_file() and (out / "report.html").is_file()


def test_epochs_0_needs_a_class_the_classifier_knows(color_tree, tmp_path):
    with pytest.raises(UserError, match="--epochs 0 keeps the head as it starts, and no class starts from"):
        train(RunConfig(data=str(color_tree), epochs=0, augment="none", input_size=64, out=str(tmp_path / "r"),
                        **FAST))


def test_keep_best_on_cached_features_keeps_epoch_0_when_training_wrecks_the_head(dogs, tmp_path, capsys):
    """A learning rate that wrecks the head: --keep-best ends where the pretrained classifier was."""
    wreck = dict(data=str(dogs), augment="none", optimizer="sgd", lr=5e3, momentum=0.0, epochs=3, **FAST)
    kept = train(RunConfig(**wreck, keep_best=True, out=str(tmp_path / "kept"), cache_dir=str(tmp_path / "c")))
    assert "kept epoch 0 (pretrained classifier alone)" in capsys.readouterr().out
    start = kept.metrics["head_start"]["val_top1"]
    assert max(r["val_top1"] for r in kept.history) < start
    assert kept.metrics["top1"] == start
    last = train(RunConfig(**wreck, out=str(tmp_path / "last"), cache_dir=str(tmp_path / "c")))
    assert last.metrics["top1"] == last.history[-1]["val_top1"] < start


def test_keep_best_on_cached_features_keeps_the_best_epoch_without_a_prior(color_tree, tmp_path, capsys):
    """No class matches: --keep-best works on the cached path all the same (epochs 1..N)."""
    run = train(RunConfig(data=str(color_tree), augment="none", optimizer="sgd", lr=20.0, epochs=6, keep_best=True,
                          input_size=64, out=str(tmp_path / "r"), **FAST))
    best = max(r["val_top1"] for r in run.history)
    assert run.metrics["top1"] == best
    assert "kept epoch" in capsys.readouterr().out


def test_the_probe_and_best_start_from_the_pretrained_classifier(dogs, tmp_path, capsys):
    """linear-probe with the pretrained start: it begins at the classifier's own top-1 and ends no worse
    on these photos; with --head-init zero it starts from nothing."""
    base = dict(data=str(dogs), recipe="linear-probe", refit=False, cache_dir=str(tmp_path / "c"), **FAST)
    pulled = train(RunConfig(**base, out=str(tmp_path / "pulled")))
    zero = train(RunConfig(**base, head_init="zero", out=str(tmp_path / "zero")))
    assert zero.metrics["head_start"] == {"from": "zero"}
    assert pulled.metrics["top1"] >= pulled.metrics["head_start"]["val_top1"] - 0.051  # at most one photo of 20
    assert pulled.metrics["top1"] >= zero.metrics["top1"]


def test_recipes_says_how_many_classes_the_pretrained_classifier_knows(dogs, color_tree, capsys):
    from warmstart.cli import main

    assert main(["recipes", "--data", str(dogs)]) == 0
    assert "4 of 4 classes are ImageNet-1k classes (by WordNet id or name): the head starts from the pretrained " \
           "classifier" in capsys.readouterr().out
    assert main(["recipes", "--data", str(color_tree)]) == 0
    assert "0 of 3 classes are ImageNet-1k classes (by WordNet id or name): the head starts from zero" \
        in capsys.readouterr().out
