"""`warmstart data audit`: a wrong label, a re-encoded train↔val copy and a blank frame planted in
real dog photos are found; training afterwards reuses the audit's features; `--exclude` reads
each of its CSVs, and a bad list is one line."""

import csv
import shutil

import pytest
from PIL import Image

from conftest import require_shared
from warmstart.cli import main

BREEDS = ["n02085936-Maltese_dog", "n02099601-golden_retriever", "n02106662-German_shepherd",
          "n02109525-Saint_Bernard"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """train/ and val/ of four breeds (8 + 2 photos each), with a Maltese in the golden retrievers'
    folder, a val photo resized to 90% and re-encoded at JPEG quality 75 in train, and a grey frame."""
    source = require_shared("stanford-dogs-4breeds") / "Images"
    root = tmp_path_factory.mktemp("planted")
    for breed in BREEDS:
        photos = sorted((source / breed).glob("*.jpg"))
        for split, chosen in (("train", photos[:8]), ("val", photos[8:10])):
            (root / split / breed).mkdir(parents=True)
            for photo in chosen:
                (root / split / breed / photo.name).symlink_to(photo)
    maltese = sorted((source / BREEDS[0]).glob("*.jpg"))[11]
    shutil.copy(maltese, root / "train" / BREEDS[1] / "wrong-label.jpg")
    leaked = sorted((root / "val" / BREEDS[2]).iterdir())[0]
    image = Image.open(leaked).convert("RGB")
    image.resize((int(image.width * 0.9), int(image.height * 0.9))).save(
        root / "train" / BREEDS[2] / "leaked-copy.jpg", quality=75)
    Image.new("RGB", (300, 200), (128, 128, 128)).save(root / "train" / BREEDS[3] / "blank.jpg")
    return root


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_the_audit_finds_what_was_planted_and_training_reuses_its_features(planted, tmp_path, capsys):
    out = tmp_path / "audit"
    options = ["--input-size", "128", "--workers", "0"]
    assert main(["data", "audit", str(planted), "--out", str(out), *options]) == 0
    printed = capsys.readouterr().out
    assert "likely label errors" in printed and "across splits: leakage" in printed, printed
    issues = _rows(out / "label_issues.csv")
    wrong = next(r for r in issues if r["path"].endswith("wrong-label.jpg"))
    assert wrong["label"] == "golden retriever" and wrong["suggested"] == "Maltese dog" and wrong["split"] == "train"
    assert issues.index(wrong) < 3  # among the first rows: ranked by label quality
    pairs = _rows(out / "duplicates.csv")
    leak = [p for p in pairs if "leaked-copy.jpg" in p["path_a"] + p["path_b"]]
    assert len(leak) == 1 and {leak[0]["split_a"], leak[0]["split_b"]} == {"train", "val"}
    assert float(leak[0]["similarity"]) >= 0.92 and len(pairs) == 1  # no false pair among real photos
    assert _rows(out / "outliers.csv")[0]["path"].endswith("blank.jpg")
    page = (out / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 3 and "leakage" in page
    assert main(["train", "--data", str(planted), "--cache-dir", str(out / "cache"), "--augment", "none",
                 "--epochs", "1", "--out", str(tmp_path / "run"), *options]) == 0
    assert "features of 35 train images from the cache" in capsys.readouterr().out
    for name in ("label_issues", "duplicates", "outliers"):
        run = tmp_path / f"run-{name}"
        assert main(["train", "--data", str(planted), "--exclude", str(out / f"{name}.csv"), "--augment", "none",
                     "--epochs", "1", "--out", str(run), *options]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
        assert f"excluded by --exclude {out / f'{name}.csv'}" in line and "(0 excluded" not in line, line
        assert "exclude" in (run / "config.yaml").read_text()


def test_exclude_lists_and_their_mistakes(planted, tmp_path, capsys):
    from warmstart.data.exclude import exclude
    from warmstart.data.sources import resolve_splits

    splits = resolve_splits(str(planted), 0.2, 0)
    listed = tmp_path / "list.txt"
    listed.write_text(f"# photos to leave out\n{planted / 'train' / BREEDS[3] / 'blank.jpg'}\n")
    kept, count = exclude(splits, listed)
    assert count == 1 and len(kept["train"]) == len(splits["train"]) - 1 and len(kept["val"]) == len(splits["val"])
    pairs = tmp_path / "duplicates.csv"
    val_photo = splits["val"].items[0]
    pairs.write_text(f"path_a,path_b,split_a,split_b\n{val_photo},{splits['train'].items[0]},val,train\n")
    kept, count = exclude(splits, pairs)  # the train-side photo of a leak goes; val stays whole
    assert count == 1 and len(kept["val"]) == len(splits["val"])
    listed.write_text("/nowhere/else.jpg\n")
    argv = ["train", "--data", str(planted), "--epochs", "1", "--input-size", "64", "--workers", "0", "--exclude"]
    assert main(argv + [str(listed)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 listed photo(s) are not in the data, e.g. '/nowhere/else.jpg'" in err
    assert main(argv + [str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "latin1.csv").write_bytes("path\nphoto-\xe9.jpg\n".encode("latin-1"))
    assert main(argv + [str(tmp_path / "latin1.csv")]) == 2
    assert "not readable UTF-8" in capsys.readouterr().err
