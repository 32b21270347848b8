"""WebDataset shards and Hugging Face datasets as data sources: `data pack`, the same photos and
labels as the folder they came from, the same training run, hostile shards, a streamed order,
and every torchrun rank's share of the keys."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from warmstart.data import pack
from warmstart.data.images import open_image
from warmstart.data.loaders import EpochBatches, streamed_order
from warmstart.data.shards import expand, stream_ids
from warmstart.data.sources import SourceOptions, load_source
from warmstart.errors import UserError

from conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(color=(200, 30, 30), size=(48, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _same_splits(a, b):
    assert set(a) == set(b)
    for name in a:
        assert a[name].class_ids == b[name].class_ids and a[name].labels == b[name].labels
        for x, y in zip(a[name].items[:5], b[name].items[:5]):
            assert np.array_equal(np.asarray(open_image(x)), np.asarray(open_image(y)))


def test_brace_patterns_expand_as_webdataset_writes_them():
    assert expand("d/train-{000..002}.tar") == ["d/train-000.tar", "d/train-001.tar", "d/train-002.tar"]
    assert expand("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    with pytest.raises(UserError, match="must run upwards"):
        expand("x-{5..1}.tar")


def test_pack_then_every_way_of_naming_the_shards_reads_the_same_photos(color_tree, tmp_path):
    folder = load_source(str(color_tree))
    spec = pack(str(color_tree), str(tmp_path / "wds"), shard_size=10, say=lambda _: None)
    assert spec.name == "dataset.yaml" and len(list((tmp_path / "wds").glob("train-*.tar"))) == 4  # 36 samples
    for data in (str(tmp_path / "wds"), str(spec), str(tmp_path / "wds" / "train-{000000..000003}.tar"),
                 "file://" + str(tmp_path / "wds" / "train-{000000..000003}.tar")):
        _same_splits(folder, load_source(data))
    listing = tmp_path / "wds" / "train.shards"
    listing.write_text("\n".join(f"train-{n:06d}.tar" for n in range(4)))
    assert load_source(str(listing))["all"].labels == folder["train"].labels
    with pytest.raises(UserError, match="already holds .tar shards"):
        pack(str(color_tree), str(tmp_path / "wds"))


def test_a_pattern_without_a_class_list_takes_the_numbers_present(tmp_path):
    _tar(tmp_path / "train-0.tar", [("a.jpg", _jpeg()), ("a.cls", b"3"), ("b.jpg", _jpeg()), ("b.cls", b"7"),
                                     ("c.jpg", _jpeg()), ("c.json", json.dumps({"label": 3}).encode())])
    _tar(tmp_path / "val-0.tar", [("d.jpg", _jpeg()), ("d.cls", b"7")])
    splits = load_source(str(tmp_path / "train-0.tar"))  # its val-* sibling comes with it
    assert splits["train"].class_ids == ["3", "7"] and splits["train"].labels == [0, 1, 0]
    assert splits["val"].labels == [1] and str(splits["val"].items[0]).endswith("val-0.tar#d")
    from warmstart.data.batched import read  # the batched pipeline: a JPEG's bytes straight from the tar

    kind, data, width, height = read(splits["val"].items[0])
    assert kind == "jpeg" and bytes(data.numpy()) == _jpeg() and (width, height) == (48, 40)


def test_hostile_shards_each_leave_one_entry_and_keep_every_good_sample(tmp_path, monkeypatch):
    from warmstart.data import shards

    good = [("g1.jpg", _jpeg()), ("g1.cls", b"0"), ("g2.jpg", _jpeg((0, 0, 200))), ("g2.cls", b"1")]
    _tar(tmp_path / "train-000.tar", good + [
        ("nolabel.jpg", _jpeg()),  # a sample missing its label
        ("outside.jpg", _jpeg()), ("outside.cls", b"9"),  # a label outside the classes
        ("notes.txt", b"hello"),  # a member that is neither image nor label
        ("badjson.jpg", _jpeg()), ("badjson.json", b"{nope"),
        ("big.jpg", b"\xff" * 5000), ("big.cls", b"0"),  # over the member limit (patched below)
    ])
    (tmp_path / "train-001.tar").write_bytes(b"this is not a tar archive" * 100)
    full = _tar(tmp_path / "full.tar", good + [("g3.jpg", _jpeg((0, 200, 0))), ("g3.cls", b"1")])
    with tarfile.open(full) as archive:
        cut = archive.getmember("g3.jpg").offset_data + 100
    (tmp_path / "train-002.tar").write_bytes(full.read_bytes()[:cut])  # truncated inside g3.jpg's data
    full.unlink()
    (tmp_path / "dataset.yaml").write_text("train: train-{000..002}.tar\nclasses: [red, blue]\n")
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 4096)
    train = load_source(str(tmp_path))["train"]
    assert len(train) == 4 and train.labels == [0, 1, 0, 1]  # g1, g2 of both readable shards
    reasons = {item.rsplit("#", 1)[-1] if "#" in item else Path(item).name: reason for item, reason in train.ignored}
    assert "no label" in reasons["nolabel"]
    assert "not one of the 2 classes" in reasons["outside"]
    assert "neither an image nor a label" in reasons["notes.txt"]
    assert "unreadable .json label" in reasons["badjson"]
    assert "over the 4,096-byte limit" in reasons["big"]
    assert "not an uncompressed tar archive" in reasons["train-001.tar"]
    assert "truncated" in reasons["g3"]


def test_a_member_claiming_gigabytes_is_skipped_from_its_header(tmp_path):
    """A header that says 8 GB in a file of a few kB: no read is attempted, no memory is taken."""
    shard = _tar(tmp_path / "part-0.tar", [("a.jpg", _jpeg()), ("a.cls", b"0")])
    with tarfile.open(shard) as archive:
        last = archive.getmember("a.cls")
        end = last.offset_data + -(-last.size // 512) * 512
    header = tarfile.TarInfo("huge.jpg")
    header.size = 8 << 30
    raw = shard.read_bytes()
    shard.write_bytes(raw[:end] + header.tobuf(format=tarfile.GNU_FORMAT) + b"\xff" * 4096)  # and then it ends
    train = load_source(str(shard))["all"]
    assert len(train) == 1
    assert any("huge" in item and ("limit" in reason or "truncated" in reason) for item, reason in train.ignored)


def test_data_check_and_train_on_hostile_shards_speak_in_lines(tmp_path, color_tree, capsys):
    from warmstart.cli import main

    pack(str(color_tree), str(tmp_path / "wds"), shard_size=12, say=lambda _: None)
    (tmp_path / "wds" / "train-000001.tar").write_bytes(b"garbage" * 50)
    assert main(["data", "check", str(tmp_path / "wds"), "--json", "--workers", "0"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any("not an uncompressed tar" in reason for _, reason in problems)
    assert main(["train", "--data", str(tmp_path / "none-{0..3}.tar"), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "none-0.tar" in err


def test_the_streamed_order_is_a_seeded_permutation_that_reads_shards_in_turn():
    streams = [i // 100 for i in range(1000)]  # ten shards of 100
    order = streamed_order(streams, 20, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(1000))
    assert order == streamed_order(streams, 20, torch.Generator().manual_seed(0))
    assert order != streamed_order(streams, 20, torch.Generator().manual_seed(1))
    # a small buffer keeps reads near one place: the first 60 samples come from at most 2 shards
    assert len({i // 100 for i in order[:60]}) <= 2
    batches = EpochBatches([0] * 1000, 8, seed=3, streams=streams, buffer=20)
    epoch0 = [i for batch in batches for _, i in batch]
    batches.set_epoch(0, start_batch=5)
    assert [i for batch in batches for _, i in batch] == epoch0[40:]  # resume at the very batch
    ranks = [EpochBatches([0] * 1000, 8, seed=3, rank=r, world=2, streams=streams, buffer=20) for r in (0, 1)]
    seen = [i for sampler in ranks for batch in sampler for _, i in batch]
    assert sorted(seen) == list(range(1000))  # each sample once across ranks


def test_stream_ids_name_each_shard_once(color_tree, tmp_path):
    pack(str(color_tree), str(tmp_path / "wds"), shard_size=10, say=lambda _: None)
    train = load_source(str(tmp_path / "wds"))["train"]
    assert stream_ids(train.items) == [i // 10 for i in range(36)]
    assert stream_ids(load_source(str(color_tree))["train"].items) is None


def _hf_dataset(splits, out: Path, parquet: bool):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=splits["train"].class_ids)})
    built = datasets.DatasetDict({("validation" if name == "val" else name): datasets.Dataset.from_dict(
        {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in images.items], "label": images.labels},
        features=features) for name, images in splits.items()})
    if parquet:
        out.mkdir(parents=True)
        for name, split in built.items():
            split.to_parquet(str(out / f"{name}-00000-of-00001.parquet"))
    else:
        built.save_to_disk(str(out))
    return out


@pytest.mark.parametrize("parquet", [False, True], ids=["save_to_disk", "parquet"])
def test_hugging_face_datasets_read_the_same_photos(color_tree, tmp_path, parquet):
    folder = load_source(str(color_tree))
    out = _hf_dataset(folder, tmp_path / "hf", parquet)
    splits = load_source(f"hf:{out}")
    _same_splits(folder, splits)
    assert splits["val"].class_names == folder["val"].class_names  # from the ClassLabel feature


def test_a_hugging_face_imagefolder_reads_as_the_folder_does(color_tree):
    pytest.importorskip("datasets")
    folder, hf = load_source(str(color_tree)), load_source(f"hf:{color_tree}")
    assert sorted(hf) == ["train", "val"] and hf["train"].class_ids == folder["train"].class_ids
    for name in ("train", "val"):
        pixels = sorted(np.asarray(open_image(item)).tobytes() for item in hf[name].items)
        assert pixels == sorted(np.asarray(open_image(item)).tobytes() for item in folder[name].items)
        assert sorted(hf[name].labels) == sorted(folder[name].labels)


def test_hugging_face_columns_are_found_or_named(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rows = {"photo_bytes": [{"bytes": _jpeg(), "path": None}] * 4, "breed": ["a", "b", "a", None]}
    data = datasets.Dataset.from_dict(rows, features=datasets.Features({"photo_bytes": datasets.Image(),
                                                                        "breed": datasets.Value("string")}))
    data.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match="--label-column NAME"):
        load_source(f"hf:{tmp_path / 'd'}")
    with pytest.raises(UserError, match="no such column"):
        load_source(f"hf:{tmp_path / 'd'}", options=SourceOptions(label_column="nope"))
    images = load_source(f"hf:{tmp_path / 'd'}", options=SourceOptions(label_column="breed"))["all"]
    assert images.class_ids == ["a", "b"] and images.labels == [0, 1, 0] and "no label" in images.ignored[0][1]
    from warmstart.cli import main

    assert main(["train", "--data", f"hf:{tmp_path / 'nothing'}", "--epochs", "1", "--quiet"]) == 2


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from warmstart.cli import main

    monkeypatch.setitem(sys.modules, "datasets", None)  # as where the extra is not installed
    assert main(["train", "--data", f"hf:{tmp_path}", "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'warmstart[hf]'" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_training_on_packed_shards_and_parquet_matches_the_folder_run(tmp_path):
    """The Done-when: `data pack` of a folder tree, then train on the shards (the val shards found
    beside them), gives the folder run's classes and top-1 with the same seed; the same for parquet."""
    from warmstart import RunConfig, train

    source = require_shared("imagewoof-mini")
    tree = tmp_path / "tree"
    for split, count in (("train", 20), ("val", 10)):
        for breed in sorted((source / split).iterdir())[:4]:
            (tree / split / breed.name).mkdir(parents=True)
            for photo in sorted(breed.iterdir())[:count]:
                (tree / split / breed.name / photo.name).symlink_to(photo)
    spec = pack(str(tree), str(tmp_path / "wds"), shard_size=25, say=lambda _: None)  # 80 train: 4 shards
    hf = _hf_dataset(load_source(str(tree)), tmp_path / "pq", parquet=True)
    runs = {}
    for name, data in (("folder", str(tree)), ("shards", str(spec.parent / "train-{000000..000003}.tar")),
                       ("parquet", f"hf:{hf}")):
        result = train(RunConfig(data=data, epochs=4, augment="none", input_size=128, quiet=True, seed=5,
                                 workers=0, out=str(tmp_path / name)))
        runs[name] = result.metrics
    assert runs["folder"]["num_classes"] == runs["shards"]["num_classes"] == runs["parquet"]["num_classes"] == 4
    assert runs["folder"]["val_images"] == runs["shards"]["val_images"] == runs["parquet"]["val_images"] == 40
    assert runs["folder"]["top1"] >= 0.8
    assert abs(runs["shards"]["top1"] - runs["folder"]["top1"]) <= 0.005
    assert abs(runs["parquet"]["top1"] - runs["folder"]["top1"]) <= 0.005
    from warmstart.evaluate import evaluate_run  # `eval --data`: the folder's run on the shards, the same photos

    on_shards = evaluate_run(tmp_path / "folder", str(spec), workers=0)
    assert on_shards.top1 == runs["folder"]["top1"] and on_shards.num_images == 40


TORCHRUN_KEYS = """
import json, os, sys
import torch.distributed as dist
from warmstart import RunConfig
from warmstart.compute.runtime import Runtime
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import data_config_for
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = RunConfig(data=sys.argv[1], batch_size=5, workers=2, seed=1, shuffle_buffer=7, input_size=32)
train = resolve_splits(config.data, 0.2, 1)["train"]
data_config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}
loader = Runtime.for_config(config).training_loader(train, data_config, config, rank, world, epochs=2)
seen = {}
for epoch in (0, 1):
    loader.batch_sampler.set_epoch(epoch)
    seen[epoch] = [train.items[i].key for batch in loader for i in batch.indices.tolist()]
json.dump(seen, open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w"))
"""


@pytest.mark.slow
def test_torchrun_ranks_see_each_sample_once_per_epoch_on_shards(color_tree, tmp_path):
    pack(str(color_tree), str(tmp_path / "wds"), shard_size=7, say=lambda _: None)
    script = tmp_path / "keys.py"
    script.write_text(TORCHRUN_KEYS)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "wds" / "dataset.yaml"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    keys = sorted(str(i.key) for i in load_source(str(tmp_path / "wds"))["train"].items)
    for epoch in ("0", "1"):
        both = ranks[0][epoch] + ranks[1][epoch]
        assert sorted(both) == keys  # every key exactly once across the two ranks
        assert set(ranks[0][epoch]).isdisjoint(ranks[1][epoch]) and ranks[0][epoch] and ranks[1][epoch]
    assert ranks[0]["0"] != ranks[0]["1"]  # a new order each epoch


@pytest.mark.slow  # an audit and two training runs
def test_audit_and_exclude_name_shard_samples(color_tree, tmp_path, capsys):
    """The audit reads shard samples (a planted train copy of a val photo is found by its bytes and
    shown), and `--exclude` takes its CSV, or a sample's bare key."""
    import csv
    import shutil

    from warmstart.cli import main

    val_photo = sorted((color_tree / "val" / "n00000001-red_thing").iterdir())[0]
    shutil.copy(val_photo, color_tree / "train" / "n00000001-red_thing" / "copied.png")
    pack(str(color_tree), str(tmp_path / "wds"), shard_size=10, say=lambda _: None)
    options = ["--input-size", "32", "--workers", "0", "--quiet"]
    assert main(["data", "audit", str(tmp_path / "wds"), "--out", str(tmp_path / "audit"), *options]) == 0
    with open(tmp_path / "audit" / "duplicates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs = [p for p in rows if p["similarity"] == "1.0"]  # (one colour a class: the rest are near copies too)
    assert len(pairs) == 1 and "#copied" in pairs[0]["path_a"] + pairs[0]["path_b"]
    assert (tmp_path / "audit" / "audit.html").read_text().count("data:image/jpeg;base64,") >= 2
    with open(tmp_path / "leak.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(pairs)
    (tmp_path / "keys.txt").write_text("copied\n")
    capsys.readouterr()
    for listing in (tmp_path / "leak.csv", tmp_path / "keys.txt"):
        assert main(["train", "--data", str(tmp_path / "wds"), "--exclude", str(listing), "--augment", "none",
                     "--epochs", "1", "--out", str(tmp_path / f"run-{listing.stem}"), *options[:-1]]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
        assert "36 train" in line and "(1 excluded" in line, line


def test_shards_at_an_fsspec_url_are_indexed_as_a_stream_and_read_by_position(color_tree, tmp_path):
    """Any fsspec URL (here its in-memory filesystem, as s3:// or gs:// would be with their backend):
    the index is one sequential pass over each shard, each photo one positioned read."""
    fsspec = pytest.importorskip("fsspec")
    pack(str(color_tree), str(tmp_path / "wds"), shard_size=10, say=lambda _: None)
    memory = fsspec.filesystem("memory")
    for shard in sorted((tmp_path / "wds").glob("*.tar")):
        memory.pipe(f"/bucket/{shard.name}", shard.read_bytes())
    remote = load_source("memory://bucket/train-{000000..000003}.tar")
    local = load_source(str(tmp_path / "wds"))
    assert sorted(remote) == ["all"] and remote["all"].labels == local["train"].labels
    assert str(remote["all"].items[0]).startswith("memory://bucket/train-000000.tar#")
    assert np.array_equal(np.asarray(open_image(remote["all"].items[17])), np.asarray(open_image(local["train"].items[17])))
    whole = tmp_path / "wds" / "train-000000.tar"
    with tarfile.open(whole) as archive:
        cut = archive.getmembers()[4].offset_data + 10  # inside the third sample's image
    memory.pipe("/bucket/broken-0.tar", whole.read_bytes()[:cut])
    broken = load_source("memory://bucket/broken-0.tar")["all"]  # a stream that ends early
    assert len(broken) == 2 and any("ends early" in reason for _, reason in broken.ignored), broken.ignored
    with pytest.raises(UserError, match="cannot open|no shards|image and a label"):
        load_source("nosuchprotocol://bucket/train-{0..1}.tar")
