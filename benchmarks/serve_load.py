"""Benchmark 5: the service under load from concurrent clients on loopback, micro-batching on and
off. A bounded number of requests (real photos), throughput, p50/p99 latency, errors.
Benchmark 5c (`slow_bodies`): /predict from one client while 40 connections trickle request
bodies a byte every 2 s, reopening each as it is closed (issue 32's slow-upload attack)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

import warmstart

from .common import SHARED, save

CLIENTS, REQUESTS_PER_CLIENT = 8, 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "warmstart", "serve", str(model), "--port", str(port), *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not start")


def _load(url: str, photos: list[bytes], clients: int, per_client: int) -> dict:
    latencies, errors = [], []
    lock = threading.Lock()

    def client(index: int) -> None:
        for i in range(per_client):
            data = photos[(index + i) % len(photos)]
            request = urllib.request.Request(url + "/predict?top_k=5", data=data,
                                             headers={"Content-Type": "image/jpeg"}, method="POST")
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    ok = response.status == 200
            except Exception as exc:  # counted, never hidden
                ok, _ = False, exc
            with lock:
                (latencies if ok else errors).append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": clients * per_client, "errors": len(errors), "seconds": elapsed,
            "requests_per_sec": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def _trained(work: Path) -> Path:
    """A Lite0 run on 10 photos of each of 4 breeds (what the service serves here)."""
    source = SHARED / "stanford-dogs-4breeds" / "Images"
    data = work / "dogs"
    for breed in sorted(source.iterdir()):
        (data / breed.name).mkdir(parents=True)
        for photo in sorted(breed.glob("*.jpg"))[:10]:
            (data / breed.name / photo.name).symlink_to(photo)
    return warmstart.train(warmstart.RunConfig(data=str(data), augment="none", epochs=5, quiet=True,
                                               out=str(work / "run"))).run_dir


def trickle(url: str, stop: threading.Event, connections: int = 40) -> list[threading.Thread]:
    """`connections` clients each sending a request body a byte every 2 s, reconnecting when closed."""
    host, port = url.rsplit("/", 1)[-1].split(":")

    def trickler():
        while not stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                 b"Content-Length: 100000\r\n\r\n")
                    while not stop.is_set():
                        sock.sendall(b"x")
                        stop.wait(2)
            except OSError:
                stop.wait(0.5)  # closed by the server: open another

    threads = [threading.Thread(target=trickler, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    return threads


def probe_while_trickled(url: str, photo: bytes, seconds: float) -> dict:
    """/predict and /health from another client every 0.5 s for `seconds` while 40 bodies trickle."""
    stop = threading.Event()
    threads = trickle(url, stop)
    statuses, latencies, health = [], [], []
    try:
        time.sleep(1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            request = urllib.request.Request(url + "/predict", data=photo, headers={"Content-Type": "image/jpeg"},
                                             method="POST")
            begin = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    answer.read()
                    statuses.append(answer.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
            latencies.append(time.monotonic() - begin)
            health.append(urllib.request.urlopen(url + "/health", timeout=5).status)
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    ms = np.array(latencies) * 1000
    return {"seconds": seconds, "connections": 40, "requests": len(statuses),
            "ok": sum(s == 200 for s in statuses), "health_ok": sum(h == 200 for h in health),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def slow_bodies(quick: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ws-bench-slow-"))
    try:
        run_dir = _trained(work)
        photo = next(iter(sorted((SHARED / "stanford-dogs-4breeds" / "Images").rglob("*.jpg")))).read_bytes()
        process, url = _start(run_dir)
        try:
            result = probe_while_trickled(url, photo, 15 if quick else 60)
        finally:
            process.terminate()
            process.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save("serve_slow_bodies" + ("_quick" if quick else ""), {"quick": quick, **result})
    return result


def run(quick: bool = False) -> dict:
    source = SHARED / "stanford-dogs-4breeds" / "Images"
    work = Path(tempfile.mkdtemp(prefix="ws-bench-serve-"))
    try:
        run_dir = _trained(work)
        photos = [p.read_bytes() for p in sorted(source.rglob("*.jpg"))[:40]]
        per_client = 10 if quick else REQUESTS_PER_CLIENT
        results = {}
        for name, flags in {"micro-batching on (max 16, 5 ms)": (), "micro-batching off": ("--no-batching",)}.items():
            process, url = _start(run_dir, *flags)
            try:
                _load(url, photos, 2, 2)  # warm-up
                results[name] = _load(url, photos, CLIENTS, per_client)
            finally:
                process.terminate()
                process.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": f"serve load: {CLIENTS} concurrent clients on loopback, EfficientNet-Lite0 at 224 px",
              "quick": quick, "clients": CLIENTS, "results": results}
    save("serve_load" + ("_quick" if quick else ""), result)
    return result
