"""A miniature Stanford Dogs (real photos from ../shared/data) as the official archives, and a
local HTTP server for them that honours Range requests and can cut a download short."""

from __future__ import annotations

import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
from scipy.io import savemat

from conftest import require_shared

PER_BREED_TRAIN, PER_BREED_TEST = 5, 2


def _cell(strings):
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = np.array([s])
    return cell


def _write_list(path: Path, files: list[str], labels: list[int]) -> None:
    savemat(str(path), {"file_list": _cell(files), "annotation_list": _cell([f[:-4] for f in files]),
                        "labels": np.array(labels, dtype=np.uint8).reshape(-1, 1)})


def build_mini_dogs(workdir: Path) -> dict[str, Path]:
    """Lay out a 4-breed Stanford Dogs and pack it as images.tar, annotation.tar and lists.tar."""
    source = require_shared("stanford-dogs-4breeds")
    layout = workdir / "layout"
    breeds = sorted(p.name for p in (source / "Images").iterdir())
    train, test = [], []
    for label, breed in enumerate(breeds, start=1):
        photos = sorted((source / "Images" / breed).glob("*.jpg"))[: PER_BREED_TRAIN + PER_BREED_TEST]
        for i, photo in enumerate(photos):
            rel = f"{breed}/{photo.name}"
            (layout / "Images" / breed).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, layout / "Images" / rel)
            (layout / "Annotation" / breed).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / "Annotation" / rel[:-4], layout / "Annotation" / rel[:-4])
            (train if i < PER_BREED_TRAIN else test).append((rel, label))
    (layout / "lists").mkdir()
    _write_list(layout / "lists" / "train_list.mat", *map(list, zip(*train)))
    _write_list(layout / "lists" / "test_list.mat", *map(list, zip(*test)))
    _write_list(layout / "lists" / "file_list.mat", *map(list, zip(*(train + test))))
    archives = workdir / "archives"
    archives.mkdir()
    with tarfile.open(archives / "images.tar", "w") as tar:
        tar.add(layout / "Images", "Images")
    with tarfile.open(archives / "annotation.tar", "w") as tar:
        tar.add(layout / "Annotation", "Annotation")
    with tarfile.open(archives / "lists.tar", "w") as tar:
        for name in ("file_list.mat", "train_list.mat", "test_list.mat"):
            tar.add(layout / "lists" / name, name)
    return {"layout": layout, "archives": archives}


class ArchiveServer:
    """Serves files from a folder on 127.0.0.1, with Range support; `cut_after[name] = n` makes
    the next full GET of `name` send only n bytes and drop the connection."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, int] = {}
        self.override: dict[str, bytes] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                return None  # quiet: tests read server.requests instead

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                path = server.folder / name
                if name not in server.override and not path.is_file():
                    self.send_error(404)
                    return
                data = server.override.get(name) or path.read_bytes()
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                cut = server.cut_after.pop(name, None) if not start else None
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/aditya86/ImageNetDogs/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def tar_with(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()
