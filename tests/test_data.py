"""Data layouts: train/val folders, a single tree split, CSV manifests; their errors."""

import csv

import pytest

from warmstart.data import readable_class_name, resolve_splits
from warmstart.errors import UserError

from conftest import COLORS, make_color_images


def test_train_val_folders(color_tree):
    splits = resolve_splits(str(color_tree), 0.2, 0)
    assert set(splits) == {"train", "val"}
    assert len(splits["train"]) == 36 and len(splits["val"]) == 12
    assert splits["train"].class_ids == ["n00000001-red_thing", "n00000002-green_thing", "n00000003-blue_thing"]
    assert splits["train"].class_names == ["red thing", "green thing", "blue thing"]
    assert splits["val"].class_counts() == [4, 4, 4]


def test_train_test_folders_carve_val_from_train_never_test(color_tree):
    (color_tree / "val").rename(color_tree / "test")
    splits = resolve_splits(str(color_tree), 0.25, 0)
    assert set(splits) == {"train", "val", "test"}
    assert len(splits["test"]) == 12 and splits["val"].class_counts() == [3, 3, 3]
    assert not set(splits["val"].items) & set(splits["test"].items)
    assert not set(splits["val"].items) & set(splits["train"].items)


def test_single_tree_is_split_stratified_and_seeded(dog_tree):
    a = resolve_splits(str(dog_tree), 0.3, seed=1)
    b = resolve_splits(str(dog_tree), 0.3, seed=1)
    c = resolve_splits(str(dog_tree), 0.3, seed=2)
    assert a["val"].items == b["val"].items and a["val"].items != c["val"].items
    assert a["val"].class_counts() == [3, 3, 3, 3] and a["train"].class_counts() == [7, 7, 7, 7]
    assert not set(a["train"].items) & set(a["val"].items)
    assert a["train"].class_names == ["Maltese dog", "golden retriever", "German shepherd", "Saint Bernard"]


def test_readable_class_names():
    assert readable_class_name("n02085620-Chihuahua") == "Chihuahua"
    assert readable_class_name("n02099601") == "golden retriever"  # bare ImageNet id
    assert readable_class_name("cats") == "cats"


def _write_manifest(path, rows):
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def test_csv_manifest_relative_paths_and_labels(tmp_path):
    for c in range(2):
        make_color_images(tmp_path / "imgs" / f"c{c}", COLORS[c], 5, seed=c)
    rows = [["image_path", "label"]] + [[f"imgs/c{c}/img_{i:03d}.jpg", ["cat", "dog"][c]]
                                        for c in range(2) for i in range(5)]
    _write_manifest(tmp_path / "meta.csv", rows)
    splits = resolve_splits(str(tmp_path / "meta.csv"), 0.2, 0)
    assert splits["train"].class_ids == ["cat", "dog"]
    assert len(splits["train"]) == 8 and splits["val"].class_counts() == [1, 1]
    # the demo's integer labels, without header, in train.csv / val.csv beside each other
    _write_manifest(tmp_path / "train.csv", [[f"imgs/c{c}/img_{i:03d}.jpg", c] for c in range(2) for i in range(4)])
    _write_manifest(tmp_path / "val.csv", [[f"imgs/c{c}/img_004.jpg", c] for c in range(2)])
    splits = resolve_splits(str(tmp_path), 0.2, 0)
    assert splits["train"].class_ids == ["0", "1"] and len(splits["val"]) == 2


@pytest.mark.parametrize("case,pattern", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("empty_class", "no images"),
    ("csv_unknown_path", "do not exist"),
    ("no_classes", "no class folders"),
])
def test_data_mistakes_are_user_errors(tmp_path, case, pattern):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "empty_class":
        make_color_images(root / "a", COLORS[0], 2, 0)
        (root / "b").mkdir()
    elif case == "csv_unknown_path":
        root.mkdir()
        _write_manifest(root / "m.csv", [["nothere.jpg", "a"], ["nope.jpg", "b"]])
        root = root / "m.csv"
    elif case == "no_classes":
        root.mkdir()
        (root / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=pattern):
        resolve_splits(str(root), 0.2, 0)
