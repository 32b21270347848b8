"""Real-world folders: every kind of odd file, handled as a user expects."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from warmstart import RunConfig, train
from warmstart.cli import main
from warmstart.data.check import check_dataset
from warmstart.data.images import open_image
from warmstart.errors import UserError

from conftest import COLORS, make_color_images

BAD = {"truncated.jpg", "zero.jpg", "text.jpg", "bomb.png", "notes.txt"}
GOOD_ODD = {"png_named.jpg", "gif_named.jpg", "cmyk.jpg", "gray.jpg", "sixteen.png", "rgba.png", "palette.png",
            "rotated.jpg", "tiny.jpg"}


def _jpeg_with_orientation(size, orientation: int) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def build_messy_tree(root):
    """Two usable classes full of odd files, one empty class, hidden and system files."""
    make_color_images(root / "red", COLORS[0], 6, seed=0)
    make_color_images(root / "blue", COLORS[2], 6, seed=1)
    odd = root / "red"
    good = (odd / "img_000.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (odd / "zero.jpg").write_bytes(b"")
    (odd / "text.jpg").write_text("this is not a picture")
    (odd / "notes.txt").write_text("collected from the web")
    rgb = Image.new("RGB", (60, 40), COLORS[0])
    rgb.save(odd / "png_named.jpg", "PNG")
    rgb.convert("P").save(odd / "gif_named.jpg", "GIF")
    rgb.convert("CMYK").save(odd / "cmyk.jpg", "JPEG")
    rgb.convert("L").save(odd / "gray.jpg", "JPEG")
    Image.fromarray(np.full((40, 60), 40000, dtype=np.uint16)).save(odd / "sixteen.png")
    rgba = Image.new("RGBA", (60, 40), (200, 30, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(odd / "rgba.png")
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    palette.save(odd / "palette.png", transparency=0)
    (odd / "rotated.jpg").write_bytes(_jpeg_with_orientation((60, 40), 6))
    Image.new("RGB", (3, 3), COLORS[0]).save(odd / "tiny.jpg")
    Image.new("1", (10_000, 9_000)).save(odd / "bomb.png")  # 90 Mpx: over PIL's bomb limit, tiny on disk
    (odd / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (odd / "._img_000.jpg").write_bytes(b"\x00\x05\x16\x07")
    (odd / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "empty_class").mkdir()
    (root / ".hidden_folder").mkdir()
    return root


def test_open_image_handles_each_usable_kind(tmp_path):
    root = build_messy_tree(tmp_path / "messy")
    for name in GOOD_ODD:
        image = open_image(root / "red" / name)
        assert image.mode == "RGB", name
    assert open_image(root / "red" / "rotated.jpg").size == (40, 60)  # EXIF orientation applied
    assert open_image(root / "red" / "sixteen.png").getpixel((5, 5))[0] == round(40000 * 255 / 65535)
    assert open_image(root / "red" / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    for name in ("truncated.jpg", "zero.jpg", "text.jpg", "bomb.png"):
        with pytest.raises(Exception):
            open_image(root / "red" / name).load()


def test_empty_class_is_an_error_unless_dropped(tmp_path):
    root = build_messy_tree(tmp_path / "messy")
    with pytest.raises(UserError, match="empty_class.*--drop-empty-classes"):
        train(RunConfig(data=str(root), input_size=64, workers=0, quiet=True, out=str(tmp_path / "r")))


@pytest.mark.parametrize("augment", ["none", "standard"])
def test_training_over_a_messy_folder_completes_and_lists_exactly_the_bad_files(tmp_path, augment):
    root = build_messy_tree(tmp_path / "messy")
    result = train(RunConfig(data=str(root), drop_empty_classes=True, val_fraction=0.5, augment=augment,
                             epochs=2, batch_size=4, input_size=64, workers=0, quiet=True, out=str(tmp_path / "r")))
    listed = (result.run_dir / "skipped.txt").read_text().splitlines()
    assert {line.split("\t")[0].rsplit("/", 1)[-1] for line in listed} == BAD
    assert result.metrics["num_classes"] == 2
    assert result.metrics["skipped_images"] == len(BAD)


def test_data_check_reports_every_problem(tmp_path, capsys):
    root = build_messy_tree(tmp_path / "messy")
    report = check_dataset(str(root), workers=2, quiet=True)
    names = {path.rsplit("/", 1)[-1] for path, _ in report.problems}
    assert names == BAD | {"empty_class"}
    assert report.usable == 12 + len(GOOD_ODD) and report.splits["all"] == {"red": 6 + len(GOOD_ODD), "blue": 6}
    assert report.imbalance == pytest.approx((6 + len(GOOD_ODD)) / 6)
    assert main(["data", "check", str(root), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert len(data["problems"]) == len(BAD) + 1 and data["sizes"]["width"]["min"] == 3
    clean = tmp_path / "clean"
    make_color_images(clean / "a", COLORS[0], 2, 0)
    make_color_images(clean / "b", COLORS[1], 2, 1)
    assert main(["data", "check", str(clean)]) == 0
    assert "0 problem file(s)" in capsys.readouterr().out


def test_balance_sampler_and_loss(tmp_path):
    root = tmp_path / "skewed"
    make_color_images(root / "many", COLORS[0], 30, 0)
    make_color_images(root / "few", COLORS[1], 6, 1)
    from warmstart.data.loaders import EpochBatches, class_weights

    labels = [0] * 30 + [1] * 6
    balanced = EpochBatches(labels, 6, seed=0, balance="sampler")
    drawn = [labels[i] for epoch in range(20) for i in balanced.order(epoch)]
    assert 0.4 < np.mean(drawn) < 0.6  # classes drawn about equally
    assert class_weights(labels, 2).tolist() == pytest.approx([36 / 60, 36 / 12])
    for balance in ("sampler", "loss"):
        result = train(RunConfig(data=str(root), balance=balance, augment="none", epochs=2, input_size=64,
                                 workers=0, quiet=True, out=str(tmp_path / balance)))
        assert result.metrics["top1"] > 0.5
