"""Hostile and clumsy inputs, generated here: memory stays bounded by the settings, a damaged file
is never used silently, and a mistake is one line with exit code 2.

The service cases run against a real `warmstart serve` process (its peak memory is read from
/proc, its /health is timed while it decodes); the rest call the library and the CLI in-process.
"""

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from warmstart import RunConfig, train
from warmstart.compute.runtime import Runtime
from warmstart.cli import main
from warmstart.config import RunConfig as Config
from warmstart.data import feature_cache as fc
from warmstart.data.images import MAX_ASPECT_RATIO
from warmstart.data.loaders import ImageDataset, collate_skipping
from warmstart.data.imageset import ImageSet
from warmstart.data.sources import resolve_splits
from warmstart.errors import UserError
from warmstart.run_dir import RunLock

from conftest import COLORS, make_color_images, make_color_tree

CPU = Runtime(torch.device("cpu"), "fp32", False)  # loads on the per-sample path, computes in fp32

MB = 1024 * 1024


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with no real pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")



# -- the service --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BOUNDARY = "hostileboundary"


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{n}\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for n, data in files)
    return body + f"--{BOUNDARY}--\r\n".encode()


class Server:
    def __init__(self, run_dir: Path, *options: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "warmstart", "serve", str(run_dir), "--port", str(self.port), *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(120):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.25)
        self.process.kill()
        raise AssertionError(f"server did not start: {self.process.stdout.read().decode()[-2000:]}")

    def reset_peak(self) -> int:
        """Resets the kernel's peak-RSS counter of the server; returns its current RSS."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(key)

    def post(self, path: str, files: list[tuple[str, bytes]], timeout: float = 120) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=multipart(files), method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> str:
        self.process.terminate()
        return self.process.communicate(timeout=20)[0].decode()


@pytest.fixture(scope="module")
def server(color_run):
    # limits raised so that the big images are decoded: memory must stay bounded all the same
    server = Server(color_run[0], "--max-request-pixels", "400000000", "--max-upload-mb", "1",
                    "--request-timeout", "1.5")
    yield server
    server.stop()


def _health_latencies(url: str, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        urllib.request.urlopen(url + "/health", timeout=5).read()
        out.append(time.perf_counter() - start)
        time.sleep(0.02)


@pytest.mark.slow
def test_service_memory_is_bounded_and_health_answers_while_decoding(server):
    thin = png(Image.new("L", (1, 50_000)))
    big = png(Image.new("1", (7000, 7000), 1))  # 49 Mpx in a few KB
    assert len(big) < 20_000
    before = server.reset_peak()
    status, body = server.post("/predict", [("thin.png", thin)])
    assert status == 413 and "aspect ratio" in body["error"]
    latencies, stop = [], threading.Event()
    watcher = threading.Thread(target=_health_latencies, args=(server.url, stop, latencies))
    watcher.start()
    try:
        status, body = server.post("/predict/batch", [(f"big{i}.png", big) for i in range(8)])
    finally:
        stop.set()
        watcher.join()
    assert status == 200 and all("predictions" in r for r in body["results"]), body
    grew = server.peak() - before
    assert grew < 300 * MB, f"the service's peak RSS grew by {grew / MB:.0f} MB"
    # the decoding runs off the event loop: /health answers at once all through. One decode of these
    # images takes ~0.16 s on this machine, so a loop held by each decode would show ~8 slow answers
    # and one held by the batch a single answer of over a second; one hiccup (the scheduler of a
    # 2-core machine, onnxruntime's threads) is allowed
    slow = [latency for latency in latencies if latency >= 0.1]
    assert len(latencies) >= 5 and len(slow) <= 1 and max(latencies) < 0.5, latencies
    # together over the request limit: refused from the headers, nothing decoded
    status, body = server.post("/predict/batch", [(f"big{i}.png", big) for i in range(9)])
    assert status == 413 and "together" in body["error"]


def _reading(sock) -> tuple[bytearray, threading.Thread]:
    """The server's answer, read by a thread as it comes (the server may close once it has answered,
    even while we still send): what arrived before a reset is in the bytearray."""
    answer = bytearray()

    def read():
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    return answer, reader


def _send_chunks(sock, total: int) -> int:
    """Chunks of zeros until `total` bytes or until the server stops reading (closes); bytes sent."""
    sent, chunk = 0, b"\0" * 65536
    try:
        while sent < total:
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
    except OSError:  # the server answered and closed: it stopped reading
        return sent
    return sent


@pytest.mark.slow
def test_abused_http_framing_is_a_400_at_once(server):
    """Issue 32 item 16: Content-Length with Transfer-Encoding (request smuggling), and a chunk
    declared larger than any body the service accepts, were closed only at the request timeout."""
    heads = [b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n",
             b"Transfer-Encoding: chunked\r\n\r\nffffffffffff\r\n"]
    for head in heads:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            answer, reader = _reading(sock)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n" + head)
            reader.join(timeout=10)
        # (the request timeout closes without an answer; a wait for the chunk would answer nothing)
        assert answer.decode(errors="replace").startswith("HTTP/1.1 400"), (head, answer[:200])
    assert urllib.request.urlopen(server.url + "/health", timeout=5).status == 200


@pytest.mark.slow
def test_chunked_upload_is_stopped_at_the_limit(server):
    for content_type in (b"image/png", b"multipart/form-data; boundary=b"):
        before = server.reset_peak()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            answer, reader = _reading(sock)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type +
                         b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            if content_type.startswith(b"multipart"):
                part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
                sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            sent = _send_chunks(sock, 300 * MB)
            reader.join(timeout=10)
        text = answer.decode(errors="replace")
        assert text.startswith("HTTP/1.1 413") and '"error"' in text, (content_type, text[:300])
        assert sent < 20 * MB, content_type
        assert server.peak() - before < 50 * MB


@pytest.mark.slow
def test_half_open_connections_are_closed_and_the_service_keeps_serving(server):
    sockets = []
    for i in range(30):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if i % 2:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n")  # headers never end
        sockets.append(sock)
    assert json.loads(urllib.request.urlopen(server.url + "/health", timeout=2).read())["status"] == "ok"
    time.sleep(2.5)
    closed = 0
    for sock in sockets:
        sock.settimeout(2)
        try:
            closed += sock.recv(1024) == b""
        except OSError:
            closed += 1
        sock.close()
    assert closed == 30


@pytest.mark.slow
def test_service_errors_share_one_shape_and_a_disconnect_is_one_info_line(color_run):
    server = Server(color_run[0])
    try:
        cases = [
            ("/predict", [("bomb.png", png_header_only(30_000, 30_000))], 413, "decompression bomb"),
            ("/predict", [("thin.png", png(Image.new("L", (8000, 1))))], 413, "aspect ratio"),
            ("/predict?top_k=0", [("a.png", png(Image.new("RGB", (40, 40))))], 422, "top_k"),
            ("/nowhere", [("a.png", b"x")], 404, "Not Found"),
            ("/predict/batch", [(f"{i}.png", b"x") for i in range(17)], 400, "Too many files"),
        ]
        for path, files, status, words in cases:
            got, body = server.post(path, files)
            assert got == status and set(body) == {"error"} and words in body["error"], (path, got, body)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
            time.sleep(0.5)
        time.sleep(0.5)
        assert json.loads(urllib.request.urlopen(server.url + "/health", timeout=2).read())["status"] == "ok"
    finally:
        log = server.stop()
    assert "disconnected before its request was complete" in log
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def _raw_post(port: int, content_length: int, first: bytes) -> socket.socket:
    """A /predict upload left half-sent: its headers and the first bytes of its body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Content-Length: %d\r\n\r\n" % content_length + first)
    return sock


def _answer(server: Server, path: str, data: bytes, content_type: str = "image/png") -> tuple[int, dict, dict]:
    """(status, headers, JSON) of an image POSTed whole, read as the answer comes: a refused upload
    is answered before its body is read, and the connection closed under the sender."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        answer, reader = _reading(sock)
        with contextlib.suppress(OSError):  # refused and closed before the whole body was sent
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % (path.encode(), content_type.encode(), len(data)) + data)
        reader.join(timeout=30)
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.slow
def test_idle_connections_never_keep_a_working_client_out(color_run):
    """Far more idle connections than the bound (renewed, as an attacker would): /health and
    /predict still answer 200 (the longest-idle are closed to make room); a request whose body has
    not arrived holds no request slot (the 503 past the bound: test_hardening_round4)."""
    server = Server(color_run[0], "--max-connections", "16", "--max-requests", "1")
    image = png(Image.new("RGB", (64, 64), (200, 30, 30)))
    idle = []  # (a stalled upload among them, closed before the server is stopped)
    try:
        for _ in range(2):  # twice: a second wave of idle connections renews the pressure
            idle += [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(40)]
            health = urllib.request.urlopen(server.url + "/health", timeout=5)
            assert health.status == 200
            status, _, body = _answer(server, "/predict", image)
            assert status == 200 and body["predictions"], body
        held = _raw_post(server.port, len(image), image[:20])  # a request whose body is unfinished
        idle.append(held)
        time.sleep(0.3)
        status, headers, body = _answer(server, "/predict", image)  # an unfinished body holds no slot (#32.3)
        assert status == 200 and body["predictions"], (status, body)
        assert urllib.request.urlopen(server.url + "/health", timeout=5).status == 200
        held.sendall(image[20:])
        assert held.recv(100).startswith(b"HTTP/1.1 200")
        assert _answer(server, "/predict", image)[0] == 200
    finally:
        for sock in idle:
            sock.close()
        log = server.stop()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_upload_memory_is_one_budget_across_requests(color_run):
    """Bodies in flight share --max-inflight-mb: while one upload holds most of it, another is
    503 with Retry-After (not queued in memory); a request that alone needs more than the whole
    budget is 413; once the first is done, the second goes through."""
    server = Server(color_run[0], "--max-inflight-mb", "24", "--max-upload-mb", "10", "--max-files", "4",
                    "--max-request-pixels", "400000000")
    big = png(Image.effect_noise((1500, 1500), 64).convert("RGB"))
    assert 5 * MB < len(big) < 8 * MB  # twice its size held (received, then read), and 4 bytes a pixel to decode: one fits in 24 MB, two do not
    held = None
    try:
        before = server.reset_peak()
        held = _raw_post(server.port, len(big), big[:4 * MB])  # declared, so held before it arrives
        time.sleep(0.5)
        status, headers, body = _answer(server, "/predict", big)
        assert status == 503 and headers.get("retry-after") == "1" and "budget" in body["error"], (status, body)
        batch = multipart([(f"{i}.png", big) for i in range(3)])
        form = f"multipart/form-data; boundary={BOUNDARY}"
        status, _, body = _answer(server, "/predict/batch", batch, form)
        assert status in (413, 503), body  # 413 when alone, 503 while the other holds its share
        held.sendall(big[4 * MB:])
        assert held.recv(100).startswith(b"HTTP/1.1 200")
        status, _, body = _answer(server, "/predict/batch", batch, form)
        assert status == 413 and "in-flight budget" in body["error"], body
        status, _, body = _answer(server, "/predict", big)
        assert status == 200, body
        grew = server.peak() - before
        assert grew < 200 * MB, f"the service's peak RSS grew by {grew / MB:.0f} MB"
    finally:
        if held is not None:
            held.close()
        log = server.stop()
    assert "Traceback" not in log, log[-3000:]


# -- images in training and predict -----------------------------------------------------------
def test_elongated_images_are_skipped_in_training_and_refused_by_predict(tmp_path, color_run, capsys):
    run_dir, _ = color_run
    make_color_images(tmp_path / "a", (200, 40, 40), 2, seed=0)
    thin = tmp_path / "a" / "thin.png"
    Image.new("RGB", (int(64 * (MAX_ASPECT_RATIO + 1)), 64)).save(thin)
    images = ImageSet([str(p) for p in sorted((tmp_path / "a").iterdir())], [0, 0, 0], ["a"], ["a"])
    from warmstart.data.transforms import eval_transform
    dataset = ImageDataset(images, eval_transform({"input_size": (3, 64, 64), "interpolation": "bicubic",
                                                   "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}))
    batch = collate_skipping([dataset[i] for i in range(3)])
    assert len(batch.labels) == 2 and batch.skipped[0][0] == str(thin) and "aspect ratio" in batch.skipped[0][1]
    assert main(["predict", str(run_dir), str(thin)]) == 1
    assert "aspect ratio" in capsys.readouterr().out


# -- run directories ----------------------------------------------------------------------------
def test_a_damaged_run_directory_is_one_line_everywhere(color_run, tmp_path, capsys):
    run_dir, root = color_run
    image = str(next((root / "val").rglob("*.jpg")))
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for argv in (["predict", str(damaged), image], ["export", str(damaged)], ["serve", str(damaged)],
                 ["eval", str(damaged)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model.safetensors is damaged" in err, (argv, err)
    (damaged / "model.json").write_text("{not json")
    assert main(["predict", str(damaged), image]) == 2
    assert "model.json is missing or damaged" in capsys.readouterr().err


def test_a_second_run_into_the_same_out_stops_with_one_line(color_run, tmp_path, capsys):
    _, root = color_run
    out = tmp_path / "shared-out"
    out.mkdir()
    seen = []

    def try_to_lock(record):  # during a real run its directory is locked
        with pytest.raises(UserError, match="in use by another warmstart run"):
            RunLock(out).__enter__()
        seen.append(record["epoch"])

    train(RunConfig(data=str(root), augment="none", epochs=1, input_size=64, workers=0, quiet=True, out=str(out)),
          on_epoch=try_to_lock)
    assert seen == [1]
    other = tmp_path / "other"
    other.mkdir()
    with RunLock(other):  # a run in progress
        assert main(["train", "--data", str(root), "--out", str(other), "--input-size", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pid {os.getpid()}" in err


def test_out_into_a_folder_of_the_users_is_refused(color_run, tmp_path, capsys):
    _, root = color_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "metrics.json").write_text("{}")
    assert main(["train", "--data", str(root), "--out", str(mine), "--input-size", "64", "--quiet"]) == 2
    assert "not a warmstart run" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "my: settings\n" and sorted(os.listdir(mine)) == [
        "config.yaml", "metrics.json"]


@pytest.mark.slow
def test_export_writes_one_onnx_file(color_run, tmp_path):
    from warmstart.export import export_run

    stale = tmp_path / "model.onnx.data"
    stale.write_bytes(b"left from an earlier export")
    result = export_run(color_run[0], "onnx", tmp_path / "model.onnx")
    assert result.same_top1 and os.listdir(tmp_path) == ["model.onnx"]


# -- the feature cache ---------------------------------------------------------------------------
def _mean_colour(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def test_a_damaged_feature_cache_is_recomputed_with_one_warning(color_tree, tmp_path):
    from warmstart.data.transforms import eval_transform

    images = resolve_splits(str(color_tree), 0.2, 0)["train"]
    transform = eval_transform({"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3,
                                "std": (0.5,) * 3, "crop_pct": 1.0})
    warnings = []
    cache = fc.FeatureCache(tmp_path, "m", warn=warnings.append)

    def features():
        return cache.features(fc.View("train", transform), images, _mean_colour, CPU, 8, 0)

    reference = features()
    expected = reference.features.clone()  # the cache maps its file: damaging the file in place changes it
    folder = cache.folder("train", cache.key(images, fc.View("train", transform, 0, None)))
    path = folder / "features.npy"
    damages = {
        "truncated": lambda: path.write_bytes(path.read_bytes()[:-200]),
        "zeroed rows": lambda: path.write_bytes(path.read_bytes()[:-48] + b"\0" * 48),
        "meta.json": lambda: (folder / "meta.json").write_text('{"key": '),
        "status.npy": lambda: (folder / "status.npy").write_bytes(b"\x93NUMPY garbage"),
        "skipped.json": lambda: (folder / "skipped.json").write_text("[1, "),
    }
    for name, damage in damages.items():
        damage()
        warnings.clear()
        again = features()
        assert len(warnings) == 1, (name, warnings)
        assert again.computed > 0 or name == "skipped.json", name
        assert torch.equal(again.features, expected) and bool(again.valid.all()), name
        assert features().computed == 0 and len(warnings) == 1, name  # mended: used as is from now on


# -- config files and manifests -------------------------------------------------------------------
def test_yaml_values_are_coerced_or_named_in_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: x\nlr: 1e-3\nweight_decay: 5E-5\nepochs: '4'\nskip: layer4\n")
    loaded = Config.from_yaml(config)
    assert (loaded.lr, loaded.weight_decay, loaded.epochs, loaded.skip) == (0.001, 5e-5, 4, ["layer4"])
    for line, words in (("epochs: ten", "epochs: 'ten' is not valid: expected a whole number (int)"),
                        ("tta: maybe", "tta: 'maybe' is not valid: expected true or false (bool)"),
                        ("lr: [1, 2]", "lr: [1, 2] is not valid: expected a number (float)"),
                        ("batch_size: 2.5", "batch_size: 2.5 is not valid")):
        config.write_text(f"data: x\n{line}\n")
        assert main(["train", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(config) in err, err


def _alias_bomb(levels: int = 9) -> str:
    """Nine levels of nine aliases: a few hundred bytes that expand to 9**9 values."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["lr", "data", "space"])
def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path, capsys, where):
    """An alias bomb in a value of the wrong type drove memory past 7 GB (the message printed the
    whole expanded value): aliases that expand beyond a small budget are refused."""
    import resource

    bomb = _alias_bomb()
    assert len(bomb) < 1024
    config, space = tmp_path / "run.yaml", tmp_path / "space.yaml"
    config.write_text("data: x\n" if where == "space" else bomb + ("data: x\n" if where == "lr" else "")
                      + f"{where}: *l8\n")
    space.write_text(bomb + "lr: {low: *l8, high: 0.1}\n" if where == "space" else "lr: {low: 0.001, high: 0.1}\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    argv = (["tune", "--config", str(config), "--space", str(space), "--trials", "1"] if where == "space"
            else ["train", "--config", str(config)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aliases expand to" in err and "over the limit of 100,000" in err and len(err) < 300, err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KB: under 100 MB


def test_an_error_shows_an_excerpt_of_a_big_value(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: x\nlr: [" + ", ".join(["1"] * 50_000) + "]\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr: [1, 1, 1, 1, ...] is not valid" in err and len(err) < 300, err


def _manifest(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_manifests_as_people_write_them(tmp_path, capsys):
    make_color_images(tmp_path / "imgs", (200, 40, 40), 4, seed=0)
    rows = "".join(f"imgs/img_{i:03d}.jpg,{label}\n" for i, label in enumerate([0, 5, 0, 5]))
    bom = _manifest(tmp_path / "bom.csv", "\ufeffimage_path,label\n" + rows.replace(",0", ",Chihuahua"))
    assert resolve_splits(str(bom), 0.5, 0)["train"].class_ids == ["5", "Chihuahua"]
    gaps = resolve_splits(str(_manifest(tmp_path / "gaps.csv", rows)), 0.5, 0)
    assert gaps["train"].class_ids == ["0", "5"]  # the labels present, not 0..5
    latin = _manifest(tmp_path / "latin.csv", rows.replace(",0", ",Bichon frisé"), "latin-1")
    assert main(["data", "check", str(latin)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not UTF-8 text" in err
    outside = tmp_path / "inner"
    outside.mkdir()
    for path in ("../imgs/img_000.jpg", str(tmp_path / "imgs" / "img_001.jpg")):
        manifest = _manifest(outside / "m.csv", f"{path},a\n{path},b\n")
        assert main(["data", "check", str(manifest)]) == 2
        assert "outside the manifest's folder" in capsys.readouterr().err
        assert main(["data", "check", str(manifest), "--allow-outside-paths", "--json"]) == 0
        capsys.readouterr()


# -- full disks ---------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A mounted tmpfs of 240 KB (and a way to grow it), where this process may mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount namespace)")
    yield mount, lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)
    subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.slow
def test_a_full_disk_during_feature_extraction_is_one_line_and_keeps_the_rows(tmp_path, small_tmpfs, capsys):
    """The cache is reserved on disk before rows are written (a sparse memory map on a full disk
    is a SIGBUS): the train features fit, the val ones do not → one line naming the folder and the
    space needed, exit 2; with room, the next run computes only what was missing."""
    cache, grow = small_tmpfs
    root = make_color_tree(tmp_path / "data", 12, 3)
    argv = ["train", "--data", str(root), "--epochs", "1", "--augment", "none", "--input-size", "64",
            "--workers", "0", "--cache-dir", str(cache), "--out"]
    assert main(argv + [str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no space left for the feature cache in " + str(cache)), err[-500:]
    assert "needs" in last and ("KB" in last or "MB" in last) and "Traceback" not in err  # sizes people read (#32.16)
    assert not list(cache.glob("*/*.tmp"))
    grow("2m")
    assert main(argv + [str(tmp_path / "r2")]) == 0
    out = capsys.readouterr().out
    assert "features of 36 train images from the cache" in out and "features of 9 val images in" in out, out


def test_a_refused_reservation_is_one_line_anywhere(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the reservation's ENOSPC, as the filesystem gives it."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "features.npy"
    path.write_bytes(b"")
    os.truncate(path, 10 * MB)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"no space left for the feature cache in .*: needs 10.0 MB"):
        fc.reserve([path], tmp_path)


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_or_the_model_is_one_line(tmp_path, small_tmpfs, capsys):
    """No 154-line traceback and no leftover .tmp: one line, and the checkpoint already there intact."""
    from warmstart.run_dir import save_model
    from warmstart.train.checkpoint import load_checkpoint, save_checkpoint

    folder, _ = small_tmpfs
    save_checkpoint(folder, {"epoch": 1, "w": torch.ones(100)})
    with pytest.raises(UserError, match=r"no space left for a checkpoint in .*free some space"):
        save_checkpoint(folder, {"epoch": 2, "w": torch.ones(200_000)})  # 800 KB on a 240 KB disk
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]
    assert load_checkpoint(folder)["epoch"] == 1
    with pytest.raises(UserError, match=r"no space left for the model in"):
        save_model(folder, torch.nn.Linear(500, 500), {"classes": 500})
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]
    root = make_color_tree(tmp_path / "data", 4, 3)
    code = main(["train", "--data", str(root), "--epochs", "1", "--augment", "none", "--input-size", "32",
                 "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(folder / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: no space left for"), err[-800:]
    assert "Traceback" not in err and not list(folder.rglob("*.tmp"))


# -- run folders after a kill -9 ------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_run_can_be_resumed_at_once(tmp_path):
    """kill -9 during a partial run with loader workers, after its first checkpoint: the lock died
    with its owner (the orphaned workers never held it), so --resume right away is not refused."""
    root = make_color_tree(tmp_path / "data", 16, 3)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "warmstart", "train", "--data", str(root), "--strategy", "partial",
               "--unfreeze-last", "1", "--epochs", "4", "--input-size", "48", "--batch-size", "8",
               "--workers", "2", "--out", str(run), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.kill()
    process.wait()
    resumed = subprocess.run([sys.executable, "-m", "warmstart", "train", "--resume", str(run), "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "model.safetensors").exists()


def _dead_run(folder: Path, checkpoint: bool) -> Path:
    """What a run killed with -9 leaves: its lock file (naming a dead pid), events, a history."""
    folder.mkdir(parents=True)
    (folder / ".warmstart-run.lock").write_text("999999999")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.dead").write_bytes(b"old")
    (folder / "history.json").write_text("[]")
    (folder / "cache").mkdir()
    (folder / "cache" / "kept").write_text("cache")
    if checkpoint:
        (folder / "checkpoints").mkdir()
        torch.save({"format": 1}, folder / "checkpoints" / "last.pt")
    return folder


@pytest.mark.slow
def test_a_fresh_run_in_a_killed_runs_folder_starts_clean_or_refuses(tmp_path, capsys):
    root = make_color_tree(tmp_path / "data", 4, 2)
    argv = ["train", "--data", str(root), "--epochs", "1", "--augment", "none", "--input-size", "32",
            "--workers", "0", "--quiet", "--out"]
    with_checkpoint = _dead_run(tmp_path / "killed-image-run", checkpoint=True)
    assert main(argv + [str(with_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an unfinished run with a checkpoint" in err and "--resume" in err, err
    assert (with_checkpoint / "checkpoints" / "last.pt").exists()  # nothing deleted
    without = _dead_run(tmp_path / "killed-cached-run", checkpoint=False)
    assert main(argv + [str(without)]) == 0
    assert not (without / "tensorboard" / "events.out.tfevents.dead").exists()
    assert (without / "cache" / "kept").exists() and (without / "model.safetensors").exists()
    assert json.loads((without / "history.json").read_text())  # the new run's own


def test_a_lock_never_names_a_dead_process(tmp_path, capsys):
    """A live lock whose file names a pid that has ended (as after a kill -9 with a successor
    still holding it): the message names no pid."""
    from warmstart.run_dir import _alive

    assert _alive("999999999") == "" and _alive(str(os.getpid())) == f" (pid {os.getpid()})"
    out = tmp_path / "busy"
    out.mkdir()
    with RunLock(out):
        (out / ".warmstart-run.lock").write_text("999999999")
        with pytest.raises(UserError) as refused:
            RunLock(out).__enter__()
    assert "in use by another warmstart run:" in str(refused.value) and "pid" not in str(refused.value)


def test_loader_workers_do_not_inherit_the_run_lock(tmp_path):
    """A forked child drops its parent's run locks: only the run's own process holds it."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out) as lock:
        pid = os.fork()
        if pid == 0:  # the child: the parent's lock descriptor is closed here
            try:
                os.fstat(lock.fd)
                os._exit(1)
            except OSError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    fd = os.open(out / ".warmstart-run.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the owner let go
    finally:
        os.close(fd)


def test_one_damaged_run_folder_does_not_hide_the_others(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, config in (("good-a", "data: x\n"), ("bad", "{{"), ("good-b", "data: y\n"), ("odd", "- a list\n")):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({"model": "m", "top1": 0.5, "epochs": 1,
                                                              "wall_seconds": 1.0}))
        (runs / name / "config.yaml").write_text(config)
    (runs / "torn").mkdir()
    (runs / "torn" / "metrics.json").write_text('{"top1": 0.')
    assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "good-a" in out and "good-b" in out, out
    for name in ("bad", "odd", "torn"):
        assert any(line.startswith(name) and "damaged" in line for line in out.splitlines()), out
    assert main(["runs", str(runs), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(Path(r["run"]).name for r in listed if r.get("damaged")) == ["bad", "odd", "torn"]
    assert main(["compare", str(runs / "good-a"), str(runs / "bad")]) == 2
    assert "is damaged" in capsys.readouterr().err


# -- names, exports, one-liners -------------------------------------------------------------------
def test_classes_never_share_a_readable_name(tmp_path):
    """`n02099601`, `golden retriever` and `n11111111-golden retriever` all read "golden retriever":
    those keep their folder names, so model.json, predict and /predict tell them apart."""
    from warmstart.data.imageset import readable_class_names

    ids = ["n02099601", "golden retriever", "n11111111-golden retriever", "n02085620-Chihuahua"]
    assert readable_class_names(ids) == ["n02099601", "golden retriever", "n11111111-golden retriever", "Chihuahua"]
    root = tmp_path / "dogs"
    for c, name in enumerate(ids[:3]):
        make_color_images(root / name, (60 * c, 90, 200 - 60 * c), 3, seed=c)
    splits = resolve_splits(str(root), 0.0, 0)
    assert len(set(splits["train"].class_names)) == 3


def test_export_refuses_to_overwrite_a_file_without_force(color_run, tmp_path, capsys):
    run_dir, _ = color_run
    mine = tmp_path / "precious.onnx"
    mine.write_bytes(b"the user's own file")
    assert main(["export", str(run_dir), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an existing file" in err and "--force" in err, err
    assert mine.read_bytes() == b"the user's own file"
    assert main(["export", str(run_dir), "--out", str(mine), "--format", "safetensors", "--force"]) == 0
    assert mine.read_bytes() != b"the user's own file"


def test_predict_says_what_a_path_is_when_it_is_no_image_file(color_run, tmp_path, capsys):
    run_dir, _ = color_run
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert main(["predict", str(run_dir), str(fifo), "/dev/null", str(tmp_path / "nowhere.jpg"), "--json"]) in (0, 1)
    out = capsys.readouterr().out
    assert out.count("not a regular file (a device, FIFO or socket)") == 2 and "file not found" in out, out


def test_recipes_count_only_the_photos_that_open(tmp_path, capsys):
    root = tmp_path / "data"
    for c, name in enumerate(["a", "b"]):
        make_color_images(root / name, COLORS[c], 4, seed=c)
        for i in range(12):
            (root / name / f"broken{i}.jpg").write_bytes(b"not a photo")
    assert main(["recipes", "--data", str(root)]) == 0
    assert "recommended (4 photos per class" in capsys.readouterr().out



@pytest.mark.slow
def test_refit_without_a_validation_split_says_so(tmp_path, capsys):
    root = tmp_path / "data"
    for c, name in enumerate(["a", "b"]):
        make_color_images(root / name, COLORS[c], 4, seed=c)
    assert main(["train", "--data", str(root), "--refit", "--val-fraction", "0", "--epochs", "1", "--augment",
                 "none", "--input-size", "32", "--workers", "0", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "refit: there is no validation split (--val-fraction 0)" in out and "split of its own" not in out, out
