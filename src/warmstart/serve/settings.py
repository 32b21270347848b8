"""The service's settings (`warmstart serve`'s flags), declared once; light to import, so that
building the command line does not load the web framework."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from ..config import ENGINES, check_declared, setting
from ..data.images import MAX_ASPECT_RATIO


@dataclass
class ServeSettings:
    """The service's settings, each declared once (its `warmstart serve` flag, default, help and
    bounds come from here)."""

    model: str = setting(..., "run directory or exported .onnx file", group="serve")
    int8: bool = setting(False, "serve the run's int8 ONNX model (exported, calibrated and checked against fp32 "
                         "first if it is not there yet)", group="serve")
    engine: str | None = setting(None, "what computes a run directory's network (default: the run's own --engine)",
                                 group="serve", choices=ENGINES)
    host: str = setting("127.0.0.1", "address to listen on", group="serve")
    port: int = setting(8000, "port to listen on", group="serve", bounds="[1, 65535]")
    workers: int = setting(1, "server processes", group="serve", bounds="[1, 64]")
    max_batch: int = setting(16, "micro-batch size limit", group="serve", bounds="[1, 1024]")
    max_wait_ms: float = setting(5.0, "how long a request waits for a batch to fill", group="serve",
                                 bounds="[0, 10000]")
    batching: bool = setting(True, "micro-batch requests that arrive together (--no-batching: one forward pass "
                             "per request)", group="serve")
    max_upload_mb: float = setting(20.0, "per-image upload limit (413 above it)", group="serve",
                                   bounds="(0, 1024]")
    max_pixels: int = setting(50_000_000, "per-image pixel limit (decompression-bomb guard, 413)", group="serve",
                              bounds="[1, 1000000000]")
    max_aspect_ratio: float = setting(MAX_ASPECT_RATIO, "refuse more elongated images (413): resizing them would "
                                      "need huge memory", group="serve", bounds="[1, 1000]")
    max_files: int = setting(16, "images per /predict/batch request", group="serve", bounds="[1, 1024]")
    max_request_pixels: int = setting(100_000_000, "pixels of all the images of one request together (413 above "
                                      "it)", group="serve", bounds="[1, 10000000000]")
    decode_threads: int = setting(2, "threads that decode uploads", group="serve", bounds="[1, 64]")
    request_timeout: float = setting(30.0, "seconds for a request (headers and body) to arrive before the "
                                     "connection is closed", group="serve", bounds="(0, 3600]")
    keep_alive: float = setting(5.0, "seconds an idle connection is kept open", group="serve", bounds="(0, 3600]")
    max_connections: int = setting(256, "open connections; past it the longest-idle ones are closed to make "
                                   "room, and past half of it an idle connection is closed after 1 s", group="serve",
                                   bounds="[2, 100000]")
    max_requests: int = setting(32, "requests in progress at once (more are answered 503 with Retry-After; "
                                "/health always answers)", group="serve", bounds="[1, 100000]")
    max_inflight_mb: float = setting(512.0, "memory that request bodies and decoding images may hold at once, "
                                     "per server process (503 with Retry-After beyond it)", group="serve",
                                     bounds="[16, 1000000]")

    def __post_init__(self) -> None:
        check_declared(self)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls) -> "ServeSettings":
        """For uvicorn worker processes, which import the app by name."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"WARMSTART_SERVE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = {"int": int, "float": float, "bool": lambda v: v == "1"}.get(f.type, str)(raw)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        return {f"WARMSTART_SERVE_{k.upper()}": ("1" if v else "0") if isinstance(v, bool) else str(v)
                for k, v in asdict(self).items()}
