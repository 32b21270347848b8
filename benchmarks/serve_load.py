"""Benchmark 5: the service under load from concurrent clients on loopback, micro-batching on and
off. A bounded number of requests (real photos), throughput, p50/p99 latency, errors."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
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


def run(quick: bool = False) -> dict:
    source = SHARED / "stanford-dogs-4breeds" / "Images"
    work = Path(tempfile.mkdtemp(prefix="ws-bench-serve-"))
    try:
        data = work / "dogs"
        for breed in sorted(source.iterdir()):
            (data / breed.name).mkdir(parents=True)
            for photo in sorted(breed.glob("*.jpg"))[:10]:
                (data / breed.name / photo.name).symlink_to(photo)
        run_dir = warmstart.train(warmstart.RunConfig(data=str(data), augment="none", epochs=5, quiet=True,
                                                      out=str(work / "run"))).run_dir
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
