"""Export (ONNX, TorchScript, safetensors) with parity, ONNX predict without torch, and the service:
API contract, bad inputs, concurrency with micro-batching, the web page in a real browser."""

import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from PIL import Image

from warmstart import RunConfig, train
from warmstart.cli import main
from warmstart.export import export_run
from warmstart.run_dir import load_run

from conftest import launch_chromium, require_browser, require_shared

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by the inner loop (-m "not slow")

BREEDS = ["n02085936-Maltese_dog", "n02099601-golden_retriever", "n02106662-German_shepherd",
          "n02109525-Saint_Bernard"]


@pytest.fixture(scope="module")
def dog_run(tmp_path_factory):
    source = require_shared("stanford-dogs-4breeds") / "Images"
    root = tmp_path_factory.mktemp("dogs")
    photos = {}
    for breed in BREEDS:
        (root / breed).mkdir()
        for photo in sorted((source / breed).glob("*.jpg"))[:12]:
            (root / breed / photo.name).symlink_to(photo)
        photos[breed] = sorted((root / breed).iterdir())[0]
    result = train(RunConfig(data=str(root), augment="none", epochs=8, input_size=128, workers=0, quiet=True,
                             val_fraction=0.25, tta=True, out=str(tmp_path_factory.mktemp("runs") / "dogs")))
    onnx_path = export_run(result.run_dir, "onnx").path
    return result.run_dir, onnx_path, photos


def test_export_formats_with_parity(dog_run, tmp_path):
    run_dir, onnx_path, _ = dog_run
    import onnx

    graph = onnx.load(str(onnx_path))
    props = {p.key: json.loads(p.value) for p in graph.metadata_props}
    # flip TTA is one pass over a batch of both views: one copy of the network in the graph
    network = load_run(run_dir).network
    assert props["tta"] is True
    assert sum(n.op_type == "Conv" for n in graph.graph.node) == sum(
        isinstance(m, torch.nn.Conv2d) for m in network.modules())
    assert props["class_names"] == ["Maltese dog", "golden retriever", "German shepherd", "Saint Bernard"]
    assert props["input_size"] == [3, 128, 128] and props["mean"] == [0.5] * 3 and props["interpolation"] == "bicubic"
    for fmt in ("torchscript", "safetensors"):
        result = export_run(run_dir, fmt, tmp_path / f"m.{fmt}")
        assert result.path.stat().st_size > 1_000_000 and result.same_top1
    assert export_run(run_dir, "torchscript", tmp_path / "t.pt").max_abs_logit_difference < 1e-4
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 0


def test_onnx_predict_matches_pytorch_without_torch(dog_run):
    run_dir, onnx_path, photos = dog_run
    images = [str(p) for p in photos.values()]
    script = ("import sys, json; sys.modules['torch'] = None\n"
              "from warmstart.predict import predict_onnx\n"
              f"print(json.dumps(predict_onnx({str(onnx_path)!r}, {images!r}, 2)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    onnx_answers = json.loads(out.stdout)
    from warmstart import predict

    torch_answers = predict(run_dir, images, 2)
    for (_, ranked, error), expected in zip(onnx_answers, torch_answers):
        assert error is None and ranked[0][0] == expected.top[0][0]
        assert ranked[0][1] == pytest.approx(expected.top[0][1], abs=1e-4)
    assert [r[1][0][0] for r in onnx_answers] == ["Maltese dog", "golden retriever", "German shepherd",
                                                  "Saint Bernard"]


@pytest.fixture(scope="module")
def int8_export(dog_run, tmp_path_factory):
    run_dir, _, _ = dog_run
    out = tmp_path_factory.mktemp("int8") / "dogs.onnx"
    return export_run(run_dir, "onnx", out, int8=True, calibration=32)


def test_int8_export_carries_the_metadata_and_keeps_the_top1(int8_export, dog_run, capsys):
    """Static QDQ int8, calibrated on training photos, gated on the validation photos: its figures
    are measured, its file is a quarter of fp32's, and it predicts what fp32 predicts."""
    import onnx

    from warmstart.predict import predict_onnx

    _, _, photos = dog_run
    fp32, int8 = int8_export.path, int8_export.int8.path
    assert int8.name == "dogs.int8.onnx" and int8.stat().st_size < 0.4 * fp32.stat().st_size
    props = {p.key: json.loads(p.value) for p in onnx.load(str(int8)).metadata_props}
    fp32_props = {p.key: json.loads(p.value) for p in onnx.load(str(fp32)).metadata_props}
    assert props == {**fp32_props, "precision": "int8"} and fp32_props["precision"] == "fp32"
    gate = int8_export.int8
    assert gate.gate_photos == 12 and gate.calibration_photos == 32 and gate.agreement >= 11 / 12
    assert gate.fp32_top1 - gate.int8_top1 <= 0.01
    # in float: the stem, the convolutions after it at its resolution that do not widen it, the classifier
    graph = onnx.load(str(int8)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_weights = sorted(n.input[1].split("model.model.")[-1] for n in graph.node
                           if n.op_type in ("Conv", "Gemm") and n.input[1] not in dequantized)
    assert float_weights == ["blocks.0.0.conv_dw.weight", "blocks.0.0.conv_pw.weight",
                             "classifier.weight", "conv_stem.weight"], float_weights
    assert len(gate.excluded) == 4 and sum(n.op_type == "Conv" for n in graph.node) > 40
    images = [str(p) for p in photos.values()]
    same = [a[1][0][0] == b[1][0][0] for a, b in zip(predict_onnx(str(int8), images, 1),
                                                     predict_onnx(str(fp32), images, 1))]
    assert sum(same) >= 3, same
    assert main(["predict", str(int8), *images[:1]]) == 0
    assert "Maltese dog" in capsys.readouterr().out


def test_the_int8_gate_fires_and_keeps_the_fp32_file(dog_run, tmp_path, capsys, monkeypatch):
    """A gate that fails leaves the fp32 file and the int8 file that passed before it (#32.6)."""
    from dataclasses import replace

    from warmstart import quantize

    run_dir, _, _ = dog_run
    out = tmp_path / "gated.onnx"
    assert main(["export", str(run_dir), "--out", str(out), "--int8", "--calibration", "8",
                 "--max-int8-drop", "100"]) == 0
    passed = (tmp_path / "gated.int8.onnx").read_bytes()
    capsys.readouterr()
    real_gate = quantize._gate
    monkeypatch.setattr(quantize, "_gate", lambda *a, **k: replace(real_gate(*a, **k), int8_top1=-1.0))  # lost it all
    assert main(["export", str(run_dir), "--out", str(out), "--int8", "--calibration", "8", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than --max-int8-drop 1" in err and "lost" in err, err
    assert "the earlier" in err and out.exists() and (tmp_path / "gated.int8.onnx").read_bytes() == passed


def test_a_model_that_cannot_be_quantised_is_one_line(dog_run, tmp_path, capsys, monkeypatch):
    import onnxruntime.quantization as quantization

    def refuses(*args, **kwargs):
        raise NotImplementedError("operator FancyOp is not supported for quantization")

    monkeypatch.setattr(quantization, "quantize_static", refuses)
    run_dir, _, _ = dog_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx"), "--int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be quantised to int8 (NotImplementedError: operator FancyOp" in err
    assert not list(tmp_path.glob("*.int8.onnx")) and not list(tmp_path.glob(".int8-*"))


def test_the_service_says_which_precision_serves(int8_export, dog_run):
    from fastapi.testclient import TestClient

    from warmstart.serve.app import ServeSettings, create_app, int8_model

    run_dir, _, _ = dog_run
    assert int8_model(str(int8_export.int8.path)) == int8_export.int8.path
    made = int8_model(str(run_dir))  # `serve RUN --int8`: exported, calibrated and gated on the way
    assert made == run_dir / "model.int8.onnx" and made.is_file()
    for path, precision in ((int8_export.int8.path, "int8"), (int8_export.path, "fp32")):
        with TestClient(create_app(ServeSettings(str(path)))) as client:
            assert client.get("/metadata").json()["precision"] == precision
            assert "m.precision" in client.get("/").text


@pytest.fixture(scope="module")
def client(dog_run):
    from fastapi.testclient import TestClient

    from warmstart.serve.app import ServeSettings, create_app

    run_dir, _, _ = dog_run
    app = create_app(ServeSettings(str(run_dir), max_upload_mb=2_000_000 / 2**20, max_pixels=20_000_000))
    with TestClient(app) as test_client:
        yield test_client


def test_api_contract(client, dog_run):
    _, _, photos = dog_run
    photo = photos["n02099601-golden_retriever"]
    answer = client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert answer.status_code == 200
    body = answer.json()
    assert body["predictions"][0]["class"] == "golden retriever" and len(body["predictions"]) == 4
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-4)
    raw = client.post("/predict?top_k=2", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200 and len(raw.json()["predictions"]) == 2
    batch = client.post("/predict/batch", files=[("files", (p.name, p.read_bytes(), "image/jpeg"))
                                                 for p in photos.values()] + [("files", ("bad.jpg", b"xx", "image/jpeg"))])
    results = batch.json()["results"]
    assert [r["predictions"][0]["class"] for r in results[:4]] == ["Maltese dog", "golden retriever",
                                                                   "German shepherd", "Saint Bernard"]
    assert "not a readable image" in results[4]["error"]
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["class_names"][1] == "golden retriever" and meta["input_size"] == [3, 128, 128]
    page = client.get("/")
    assert page.status_code == 200 and "Which breed" in page.text
    assert client.get("/docs").status_code == 404  # its page would load scripts from a CDN
    assert client.get("/openapi.json").json()["paths"]["/predict"]


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_inputs_get_4xx_json_and_the_service_keeps_serving(client, dog_run):
    _, _, photos = dog_run
    good = photos["n02085936-Maltese_dog"].read_bytes()
    cases = {
        "not an image": (client.post, {"files": {"file": ("a.jpg", b"hello, world", "image/jpeg")}}, 400),
        "truncated": (client.post, {"files": {"file": ("t.jpg", good[: len(good) // 3], "image/jpeg")}}, 400),
        "empty body": (client.post, {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400),
        "too large": (client.post, {"content": b"\xff" * 2_100_000, "headers": {"Content-Type": "image/jpeg"}}, 413),
        "bomb": (client.post, {"files": {"file": ("b.png", _png_bytes(Image.new("1", (6000, 5000))), "image/png")}},
                 413),
        "wrong content type": (client.post, {"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415),
        "form without file": (client.post, {"files": {"name": (None, b"x")}}, 400),
        "urlencoded form": (client.post, {"data": {"name": "x"}}, 415),
        "bad top_k": (client.post, {"files": {"file": ("a.jpg", good, "image/jpeg")}, "params": {"top_k": 0}}, 422),
    }
    for name, (call, kwargs, status) in cases.items():
        response = call("/predict", **kwargs)
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"].startswith("application/json"), name
        assert "error" in response.json() or "detail" in response.json(), name
    assert client.post("/predict", files={"file": ("ok.jpg", good, "image/jpeg")}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(dog_run):
    run_dir, _, _ = dog_run
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "warmstart", "serve", str(run_dir), "--port", str(port),
                                "--max-wait-ms", "50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"server did not start: {process.stdout.read().decode()[-2000:]}")
    yield url
    process.terminate()
    process.wait(timeout=20)


def test_concurrent_requests_are_micro_batched_and_answered_correctly(server, dog_run):
    from warmstart.serve.client import predict_remote

    _, _, photos = dog_run
    expected = {"n02085936-Maltese_dog": "Maltese dog", "n02099601-golden_retriever": "golden retriever",
                "n02106662-German_shepherd": "German shepherd", "n02109525-Saint_Bernard": "Saint Bernard"}
    before = json.loads(urllib.request.urlopen(server + "/health").read())["batches"]
    answers, threads = [], []

    def ask(breed):
        answers.append((breed, predict_remote(server, photos[breed], 1)))

    for i in range(24):
        threads.append(threading.Thread(target=ask, args=(BREEDS[i % 4],)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(answers) == 24
    assert all(a["predictions"][0]["class"] == expected[breed] for breed, a in answers)
    batches = json.loads(urllib.request.urlopen(server + "/health").read())["batches"] - before
    assert batches < 24  # requests arriving together shared forward passes


def test_predict_client_against_the_server(server, dog_run, capsys):
    _, _, photos = dog_run
    assert main(["predict", "--server", server, str(photos["n02109525-Saint_Bernard"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == "Saint Bernard"


def test_web_page_in_a_real_browser(server, dog_run):
    sync_api = require_browser()
    _, _, photos = dog_run
    photo = photos["n02106662-German_shepherd"]
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.goto(server + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector(".result .name", timeout=60_000)
        names = page.locator(".result .name").all_inner_texts()
        shown = page.eval_on_selector("#preview", "img => img.complete && img.naturalWidth > 0")
        browser.close()
    assert names[0] == "German shepherd" and len(names) == 4 and shown
