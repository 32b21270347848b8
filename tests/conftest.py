import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# never reach for the network in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the engines' exported graphs: one cache for the session's tests (and their subprocesses), never ~/.cache
os.environ.setdefault("WARMSTART_ENGINE_CACHE", tempfile.mkdtemp(prefix="warmstart-engines-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COLORS = [(200, 40, 40), (40, 180, 40), (40, 60, 210), (220, 200, 40)]


def require_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (the real photos live in ../shared/data)")
    return path


def make_color_images(folder: Path, color, count: int, seed: int, size: int = 40) -> None:
    """Small images of one dominant colour with noise: learnable, and fast to decode."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = np.array(color, dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg", quality=90)


def make_color_tree(root: Path, train: int, val: int, names=("red", "green", "blue")) -> Path:
    """ROOT/train/<name>/* and ROOT/val/<name>/*, one colour per class."""
    for c, name in enumerate(names):
        make_color_images(root / "train" / name, COLORS[c], train, seed=c)
        make_color_images(root / "val" / name, COLORS[c], val, seed=100 + c)
    return root


@pytest.fixture
def color_tree(tmp_path) -> Path:
    """ROOT/train/<class>/* and ROOT/val/<class>/* with 3 colour classes."""
    root = tmp_path / "colors"
    for c, name in enumerate(["n00000001-red_thing", "n00000002-green_thing", "n00000003-blue_thing"]):
        make_color_images(root / "train" / name, COLORS[c], 12, seed=c)
        make_color_images(root / "val" / name, COLORS[c], 4, seed=100 + c)
    return root


@pytest.fixture
def dog_tree(tmp_path) -> Path:
    """A single ROOT/<class>/* tree of real dog photos (symlinks into ../shared/data)."""
    source = require_shared("stanford-dogs-4breeds") / "Images"
    root = tmp_path / "dogs"
    for breed in sorted(source.iterdir()):
        target = root / breed.name
        target.mkdir(parents=True)
        for photo in sorted(breed.glob("*.jpg"))[:10]:
            (target / photo.name).symlink_to(photo)
    return root


@pytest.fixture(scope="module")
def color_run(tmp_path_factory):
    """(run directory, data) of a small trained run on 3 colour classes (64 px, 2 epochs), per module."""
    from warmstart import RunConfig, train

    root = make_color_tree(tmp_path_factory.mktemp("colors"), 8, 3)
    result = train(RunConfig(data=str(root), augment="none", epochs=2, input_size=64, workers=0, quiet=True,
                             out=str(tmp_path_factory.mktemp("runs") / "colors")))
    return result.run_dir, root


@pytest.fixture
def lite0():
    """The bundled EfficientNet-Lite0 with a new 3-class head, in eval mode."""
    from warmstart.models.create import create_model

    model, _, _ = create_model("efficientnet_lite0", 3, "bundled")
    return model.eval()


FAST = ["--input-size", "64", "--workers", "0", "--quiet"]


# headless Chromium from Debian's packages; flags so it makes no network calls of its own
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def require_browser():
    """Playwright's sync API, or a skip where Debian's chromium is not installed (.ci/run installs it)."""
    import shutil

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return pytest.importorskip("playwright.sync_api")


def launch_chromium(playwright):
    import shutil

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
