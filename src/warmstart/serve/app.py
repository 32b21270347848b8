"""The breed-recognition service: FastAPI on uvicorn, micro-batched inference, a web page.

Client mistakes (no image, a broken or huge image, a wrong content type) get a 4xx with a JSON
error and the service keeps serving; only a failure of the service itself is a 500.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, ImageOps

from ..data.images import to_rgb
from .backends import load_backend, top_k

PAGE = Path(__file__).with_name("page.html")


@dataclass
class ServeSettings:
    model: str
    max_batch: int = 16
    max_wait_ms: float = 5.0
    batching: bool = True
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000

    @classmethod
    def from_env(cls) -> "ServeSettings":
        """For uvicorn worker processes, which import the app by name."""
        return cls(
            model=os.environ["WARMSTART_SERVE_MODEL"],
            max_batch=int(os.environ.get("WARMSTART_SERVE_MAX_BATCH", 16)),
            max_wait_ms=float(os.environ.get("WARMSTART_SERVE_MAX_WAIT_MS", 5.0)),
            batching=os.environ.get("WARMSTART_SERVE_BATCHING", "1") == "1",
            max_upload_bytes=int(os.environ.get("WARMSTART_SERVE_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)),
            max_pixels=int(os.environ.get("WARMSTART_SERVE_MAX_PIXELS", 50_000_000)),
        )

    def to_env(self) -> dict[str, str]:
        return {"WARMSTART_SERVE_MODEL": str(self.model), "WARMSTART_SERVE_MAX_BATCH": str(self.max_batch),
                "WARMSTART_SERVE_MAX_WAIT_MS": str(self.max_wait_ms),
                "WARMSTART_SERVE_BATCHING": "1" if self.batching else "0",
                "WARMSTART_SERVE_MAX_UPLOAD_BYTES": str(self.max_upload_bytes),
                "WARMSTART_SERVE_MAX_PIXELS": str(self.max_pixels)}


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ClientError(400, "empty upload: send an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ClientError(413, f"image is {image.width}x{image.height} pixels, over the limit of "
                                   f"{max_pixels:,} pixels")
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ClientError:
        raise
    except Exception as exc:
        raise ClientError(400, f"not a readable image ({exc.__class__.__name__}): send a JPEG, PNG, GIF or WebP "
                               f"file") from None


class MicroBatcher:
    """Requests that arrive together share one forward pass: up to max_batch images, waiting at
    most max_wait_ms for the batch to fill."""

    def __init__(self, backend, max_batch: int, max_wait_ms: float, enabled: bool = True):
        self.backend = backend
        self.max_batch = max_batch if enabled else 1
        self.max_wait = max_wait_ms / 1000.0 if enabled else 0.0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.batches = 0
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=False)

    async def probabilities(self, images: list[Image.Image]):
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            await self.queue.put((image, future))
            futures.append(future)
        return [await f for f in futures]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            try:
                probs = await loop.run_in_executor(self.executor, self.backend.probabilities, [b[0] for b in batch])
                self.batches += 1
                for (_, future), row in zip(batch, probs):
                    if not future.done():
                        future.set_result(row)
            except Exception as exc:  # a failure of the model: every waiting request learns of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)


def create_app(settings: ServeSettings) -> FastAPI:
    backend = load_backend(settings.model)
    batcher = MicroBatcher(backend, settings.max_batch, settings.max_wait_ms, settings.batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="warmstart", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def read_images(request: Request, many: bool) -> list[tuple[str, bytes]]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes * (16 if many else 1) + 65536:
            raise ClientError(413, f"upload of {int(length):,} bytes is over the limit of "
                                   f"{settings.max_upload_bytes:,} bytes per image")
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise ClientError(400, "no file in the form: send the image as the 'file' field")
        elif content_type.startswith(("image/", "application/octet-stream")) and not many:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_upload_bytes:
                    raise ClientError(413, f"upload is over the limit of {settings.max_upload_bytes:,} bytes")
            files = [("body", bytes(body))]
        else:
            raise ClientError(415, f"content type {content_type or 'none'!r} is not accepted: send multipart/form-data "
                                   f"with a 'file' field" + ("" if many else ", or the image bytes as image/*"))
        for name, data in files:
            if len(data) > settings.max_upload_bytes:
                raise ClientError(413, f"{name}: {len(data):,} bytes is over the limit of "
                                       f"{settings.max_upload_bytes:,} bytes")
        return files

    @app.post("/predict")
    async def predict(request: Request, top_k_: int = Query(5, alias="top_k", ge=1, le=1000)):
        files = await read_images(request, many=False)
        if len(files) != 1:
            raise ClientError(400, f"send one image to /predict ({len(files)} received): use /predict/batch for more")
        image = decode_upload(files[0][1], settings.max_pixels)
        start = time.perf_counter()
        probs = (await batcher.probabilities([image]))[0]
        ranked = top_k(probs[None], backend.class_names, top_k_)[0]
        return {"predictions": [{"class": c, "probability": p} for c, p in ranked],
                "milliseconds": round(1000 * (time.perf_counter() - start), 2)}

    @app.post("/predict/batch")
    async def predict_batch(request: Request, top_k_: int = Query(5, alias="top_k", ge=1, le=1000)):
        files = await read_images(request, many=True)
        results, images, positions = [None] * len(files), [], []
        for i, (name, data) in enumerate(files):
            try:
                images.append(decode_upload(data, settings.max_pixels))
                positions.append(i)
            except ClientError as exc:
                results[i] = {"file": name, "error": exc.message}
        probs = await batcher.probabilities(images) if images else []
        for i, row in zip(positions, probs):
            ranked = top_k(row[None], backend.class_names, top_k_)[0]
            results[i] = {"file": files[i][0], "predictions": [{"class": c, "probability": p} for c, p in ranked]}
        return {"results": results}

    @app.get("/health")
    async def health():
        return {"status": "ok", "classes": len(backend.class_names), "batches": batcher.batches}

    @app.get("/metadata")
    async def metadata():
        return {**backend.meta, "server": {k: v for k, v in asdict(settings).items() if k != "model"},
                "backend": type(backend).__name__}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    return app


def app_from_env() -> FastAPI:
    return create_app(ServeSettings.from_env())


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    import uvicorn

    load_backend(settings.model)  # a bad model path fails here, as one line, before any worker starts
    if workers > 1:
        os.environ.update(settings.to_env())
        uvicorn.run("warmstart.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers)
    else:
        uvicorn.run(create_app(settings), host=host, port=port)
