"""Stanford Dogs: download (resumable, verified, safe, idempotent), the official split, crop-to-box."""

import json
import subprocess
import sys

import pytest

from warmstart import RunConfig, evaluate, train
from warmstart.data import resolve_splits
from warmstart.data.download import DownloadError, download_stanford_dogs
from warmstart.data.images import BoxedImage, open_image
from warmstart.data.stanford_dogs import largest_box, load_stanford_dogs

from dogs_fixture import ArchiveServer, build_mini_dogs, tar_with, truncated


@pytest.fixture(scope="module")
def mini_dogs(tmp_path_factory):
    return build_mini_dogs(tmp_path_factory.mktemp("mini-dogs"))


def test_download_verifies_extracts_and_reruns_as_a_no_op(mini_dogs, tmp_path):
    with ArchiveServer(mini_dogs["archives"]) as server:
        root = download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
        assert sorted(name for name, _ in server.requests) == ["annotation.tar", "images.tar", "lists.tar"]
        assert len(list((root / "Images").rglob("*.jpg"))) == 28
        assert (root / "train_list.mat").is_file() and len([p for p in (root / "Annotation").rglob("*") if p.is_file()]) == 28
        server.requests.clear()
        download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
        assert server.requests == []  # everything present and valid: nothing fetched


def test_interrupted_download_resumes_with_range(mini_dogs, tmp_path):
    images = (mini_dogs["archives"] / "images.tar").read_bytes()
    with ArchiveServer(mini_dogs["archives"]) as server:
        server.cut_after["images.tar"] = len(images) // 3  # the connection drops a third of the way
        root = download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
        ranges = [r for name, r in server.requests if name == "images.tar"]
        assert ranges == [None, f"bytes={len(images) // 3}-"]
        assert (root / "images.tar").read_bytes() == images

        # a .part left by an earlier, killed run is resumed, not restarted
        other = tmp_path / "other"
        other.mkdir()
        (other / "lists.tar.part").write_bytes((mini_dogs["archives"] / "lists.tar").read_bytes()[:1000])
        server.requests.clear()
        download_stanford_dogs(other, server.url, quiet=True)
        assert ("lists.tar", "bytes=1000-") in server.requests


def test_corrupted_archive_is_detected_and_removed(mini_dogs, tmp_path):
    with ArchiveServer(mini_dogs["archives"]) as server:
        server.override["images.tar"] = truncated((mini_dogs["archives"] / "images.tar").read_bytes())
        with pytest.raises(DownloadError, match="images.tar"):
            download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
        assert not (tmp_path / "dogs" / "images.tar").exists()
        # an archive that is a complete tar but misses images is caught by the counts from the lists
        server.override["images.tar"] = tar_with({"Images/n1-x/a.jpg": b"x"})
        with pytest.raises(DownloadError, match="the lists name 28"):
            download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
        del server.override["images.tar"]
        root = download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
        assert len(list((root / "Images").rglob("*.jpg"))) == 28


def test_path_traversal_in_an_archive_is_refused(mini_dogs, tmp_path):
    with ArchiveServer(mini_dogs["archives"]) as server:
        server.override["lists.tar"] = tar_with({"../escape.mat": b"x", "file_list.mat": b"y"})
        with pytest.raises(DownloadError, match="unsafe"):
            download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
        server.override["lists.tar"] = tar_with({"file_list.mat": b"y"}, links={"train_list.mat": "../../outside"})
        with pytest.raises(DownloadError, match="unsafe.*train_list.mat"):
            download_stanford_dogs(tmp_path / "dogs", server.url, quiet=True)
    assert not (tmp_path / "escape.mat").exists() and not (tmp_path / "dogs" / "train_list.mat").exists()


def test_official_split_and_validation_from_train(mini_dogs):
    root = mini_dogs["layout"]  # lists under lists/
    splits = load_stanford_dogs(root)
    assert len(splits["train"]) == 20 and len(splits["test"]) == 8
    assert splits["train"].class_names == ["Maltese dog", "golden retriever", "German shepherd", "Saint Bernard"]
    assert splits["test"].class_counts() == [2, 2, 2, 2]
    resolved = resolve_splits(str(root), 0.2, seed=0)
    assert set(resolved) == {"train", "val", "test"} and resolved["val"].class_counts() == [1, 1, 1, 1]
    assert not set(resolved["val"].items) & set(splits["test"].items)
    assert set(resolved["val"].items) <= set(splits["train"].items)


def test_crop_to_box_uses_the_largest_box(mini_dogs, tmp_path):
    xml = tmp_path / "two_dogs"
    xml.write_text("<annotation><object><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>40</ymax>"
                   "</bndbox></object><object><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>205</xmax><ymax>106</ymax>"
                   "</bndbox></object></annotation>")
    assert largest_box(xml) == (5, 6, 205, 106)
    splits = load_stanford_dogs(mini_dogs["layout"], crop_to_box=True)
    item = splits["train"].items[0]
    assert isinstance(item, BoxedImage)
    left, top, right, bottom = item.box
    assert open_image(item).size == (right - left, bottom - top)


@pytest.mark.slow  # an end-to-end run: outside the inner loop
def test_train_and_eval_on_stanford_dogs_layout(mini_dogs, tmp_path):
    result = train(RunConfig(data=str(mini_dogs["layout"]), crop_to_box=True, augment="none", epochs=3,
                             input_size=96, workers=0, quiet=True, out=str(tmp_path / "run")))
    assert result.metrics["crop_to_box"] and result.metrics["num_classes"] == 4
    assert result.metrics["test_images"] == 8 and (result.run_dir / "eval_test.json").is_file()
    config = (result.run_dir / "config.yaml").read_text()
    assert "crop_to_box: true" in config
    test = evaluate(result.run_dir, split="test")
    assert test.num_images == 8 and test.split == "test"


@pytest.mark.slow
def test_data_stanford_dogs_downloads_on_first_use(mini_dogs, tmp_path):
    with ArchiveServer(mini_dogs["archives"]) as server:
        env = {"WARMSTART_DATA": str(tmp_path / "data"), "WARMSTART_STANFORD_DOGS_URL": server.url,
               "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-m", "warmstart", "train", "--data", "stanford-dogs", "--epochs", "1",
                              "--augment", "none", "--input-size", "64", "--workers", "0", "--quiet", "--out",
                              str(tmp_path / "run")], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "stanford-dogs" / "Images").is_dir()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_images"] == 16 and metrics["val_images"] == 4


@pytest.mark.slow
def test_cli_download_command(mini_dogs, tmp_path):
    with ArchiveServer(mini_dogs["archives"]) as server:
        out = subprocess.run([sys.executable, "-m", "warmstart", "data", "download", "stanford-dogs", "--dir",
                              str(tmp_path / "d"), "--base-url", server.url, "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0 and "ready: warmstart train --data" in out.stdout
