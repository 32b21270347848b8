"""The breed-recognition service: FastAPI on uvicorn, micro-batched inference, a web page.

Client mistakes (no image, a broken or huge image, a wrong content type) get a 4xx with a JSON
`{"error": "..."}` and the service keeps serving; only a failure of the service itself is a 500.
Memory is bounded by the settings, whatever a request claims: bodies are counted as they arrive
against one in-flight budget shared by all requests (serve/admission.py), image sizes are checked
from their headers, and uploads are decoded off the event loop, each request's images one at a
time within its share of the budget, and shrunk to the model's input right away.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time

import numpy as np
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..data.images import ImageTooLarge, check_size, decode, open_lazily
from ..errors import UserError
from ..predict import load_backend, top_k
from .admission import MB, Admission, Allowance, Budget, ClientError, Pressure
from .settings import ServeSettings

PAGE = Path(__file__).with_name("page.html")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the files
log = logging.getLogger("uvicorn.error")  # uvicorn's own log (INFO and up), despite its name


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the header (no pixels decoded); 400 for what is not an image."""
    if not data:
        raise ClientError(400, "empty upload: send an image file")
    try:
        with open_lazily(io.BytesIO(data)) as image:
            return image.width, image.height
    except ImageTooLarge as exc:
        raise ClientError(413, f"image is {exc}") from None
    except Exception as exc:
        raise ClientError(400, f"not a readable image ({exc.__class__.__name__}): send a JPEG, PNG, GIF or WebP "
                               f"file") from None


def decode_upload(data: bytes, settings: ServeSettings, shrink=None) -> Image.Image:
    """Upload bytes to an RGB image, refused with 413 when too large, 400 when unreadable; then
    shrunk at once (`shrink`: the model's first resize) so that no full-size image is kept."""
    try:
        return decode(io.BytesIO(data), settings.max_pixels, settings.max_aspect_ratio, shrink=shrink)
    except ImageTooLarge as exc:
        raise ClientError(413, f"image is {exc}") from None
    except Exception as exc:
        raise ClientError(400, f"not a readable image ({exc.__class__.__name__}): send a JPEG, PNG, GIF or WebP "
                               f"file") from None


class Decoder:
    """Decodes uploads in a few threads, so that the event loop keeps answering (e.g. /health)
    while big images decode; the memory they need is held from the request's allowance first."""

    BYTES_PER_PIXEL = 4  # the decoded image and the decoder's own buffers

    def __init__(self, settings: ServeSettings, shrink):
        self.settings, self.shrink = settings, shrink
        self.executor = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")

    async def images(self, uploads: list[tuple[bytes, int]], allowance: Allowance) -> list:
        """Each (bytes, pixels) decoded, one at a time, or its ClientError."""
        if uploads:
            allowance.take(self.BYTES_PER_PIXEL * max(pixels for _, pixels in uploads), "decoding its largest image")
        loop = asyncio.get_running_loop()
        out = []
        for data, _ in uploads:
            try:
                out.append(await loop.run_in_executor(self.executor, decode_upload, data, self.settings, self.shrink))
            except ClientError as exc:
                out.append(exc)
        return out

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


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


def limited(request: Request, limit: int, declared: int) -> Request:
    """The request with its body counted as it is read: 413 as soon as it passes `limit` bytes,
    whatever Content-Length said (or chunked encoding left unsaid). The files read from it are held
    from the service's in-flight budget (request.state.allowance; the bytes as received are held by
    Admission, which received the body first): what Content-Length declares at once, anything beyond
    it as it is read."""
    allowance, held, received = request.state.allowance, 0, 0

    def hold(size: int) -> None:
        nonlocal held
        if size > held:
            allowance.take(size - held, "this request's body")  # the files read from the received bytes
            held = size

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise ClientError(413, f"request body is over the limit of {limit:,} bytes")
            hold(received)
        return message

    hold(declared)
    return Request(request.scope, receive)


def body_limit(settings: ServeSettings, many: bool) -> int:
    """The most bytes a request body may hold: one image's limit (or --max-files of them) and the form."""
    return settings.max_upload_bytes * (settings.max_files if many else 1) + FORM_OVERHEAD


async def read_uploads(request: Request, settings: ServeSettings, many: bool) -> list[tuple[str, bytes]]:
    """(name, bytes) of the uploaded images: a multipart form's files, or a raw image body."""
    per_file = settings.max_upload_bytes
    limit = body_limit(settings, many)
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else 0
    if declared > limit:
        raise ClientError(413, f"upload of {declared:,} bytes is over the limit of {limit:,} bytes")
    content_type = request.headers.get("content-type", "")
    body = limited(request, limit, declared)
    if content_type.startswith("multipart/form-data"):
        form = await body.form(max_files=settings.max_files, max_fields=settings.max_files)
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise ClientError(400, "no file in the form: send the image as the 'file' field")
    elif content_type.startswith(("image/", "application/octet-stream")) and not many:
        files = [("body", b"".join([chunk async for chunk in body.stream()]))]
    else:
        raise ClientError(415, f"content type {content_type or 'none'!r} is not accepted: send multipart/form-data "
                               f"with a 'file' field" + ("" if many else ", or the image bytes as image/*"))
    for name, data in files:
        if len(data) > per_file:
            raise ClientError(413, f"{name}: {len(data):,} bytes is over the limit of {per_file:,} bytes")
    return files


def checked_sizes(files: list[tuple[str, bytes]], settings: ServeSettings) -> list:
    """Each file's pixel count (or its ClientError), from the headers; the request's total bounded."""
    sizes = []
    for _, data in files:
        try:
            width, height = image_size(data)
            check_size(width, height, settings.max_pixels, settings.max_aspect_ratio)
            sizes.append(width * height)
        except ImageTooLarge as exc:
            sizes.append(ClientError(413, f"image is {exc}"))
        except ClientError as exc:
            sizes.append(exc)
    total = sum(s for s in sizes if isinstance(s, int))
    if total > settings.max_request_pixels:
        raise ClientError(413, f"the images of this request have {total:,} pixels together, over the limit of "
                               f"{settings.max_request_pixels:,}: send fewer or smaller images per request")
    return sizes


def add_error_handlers(app: FastAPI) -> None:
    """One error shape everywhere: {"error": "..."}; a client that went away is one INFO line."""

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError):
        # a body refused part-way is not read to its end: such errors close the connection (their headers)
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                            for e in exc.errors())
        return JSONResponse({"error": reasons}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):  # a failure of ours: still one JSON shape, and logged
        log.error("%s %s failed: %s: %s", request.method, request.url.path, exc.__class__.__name__, exc)
        return JSONResponse({"error": f"the service failed on this request ({exc.__class__.__name__}): see its "
                                      f"log"}, status_code=500)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect):
        log.info("client %s disconnected before its request was complete", request.client.host if request.client
                 else "?")
        return Response(status_code=499)


def create_app(settings: ServeSettings) -> FastAPI:
    backend = load_backend(settings.model, settings.engine)
    batcher = MicroBatcher(backend, settings.max_batch, settings.max_wait_ms, settings.batching)
    decoder = Decoder(settings, backend.shrink)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        decoder.close()

    # no /docs or /redoc: their pages load scripts from a CDN, which an offline service cannot reach
    # (and should not make its users' browsers fetch); the schema is served as /openapi.json
    app = FastAPI(title="warmstart", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.budget = batcher, Budget(int(settings.max_inflight_mb * MB))
    app.state.pressure = Pressure()
    app.add_middleware(Admission, budget=app.state.budget, max_requests=settings.max_requests,
                       max_body=lambda path: body_limit(settings, many=path != "/predict"),
                       pressure=app.state.pressure)
    add_error_handlers(app)

    def ranked(row, k: int) -> list[dict]:
        if not np.isfinite(row).all():
            raise ClientError(500, "the model's output is not finite: its weights are damaged; restore or retrain the run")
        return [{"class": c, "probability": p} for c, p in top_k(row[None], backend.class_names, k)[0]]

    @app.post("/predict")
    async def predict(request: Request, top_k_: int = Query(5, alias="top_k", ge=1, le=1000)):
        files = await read_uploads(request, settings, many=False)
        if len(files) != 1:
            raise ClientError(400, f"send one image to /predict ({len(files)} received): use /predict/batch for more")
        size = checked_sizes(files, settings)[0]
        if isinstance(size, ClientError):
            raise size
        image = (await decoder.images([(files[0][1], size)], request.state.allowance))[0]
        if isinstance(image, ClientError):
            raise image
        start = time.perf_counter()
        probs = (await batcher.probabilities([image]))[0]
        return {"predictions": ranked(probs, top_k_), "milliseconds": round(1000 * (time.perf_counter() - start), 2)}

    @app.post("/predict/batch")
    async def predict_batch(request: Request, top_k_: int = Query(5, alias="top_k", ge=1, le=1000)):
        files = await read_uploads(request, settings, many=True)
        sizes = checked_sizes(files, settings)
        readable = [i for i, size in enumerate(sizes) if not isinstance(size, ClientError)]
        outcome = dict(zip(readable, await decoder.images([(files[i][1], sizes[i]) for i in readable],
                                                          request.state.allowance)))
        images = [i for i in readable if not isinstance(outcome[i], ClientError)]
        for i, row in zip(images, await batcher.probabilities([outcome[i] for i in images])):
            outcome[i] = row
        return {"results": [{"file": name, "error": outcome.get(i, sizes[i]).message}
                            if isinstance(outcome.get(i, sizes[i]), ClientError)
                            else {"file": name, "predictions": ranked(outcome[i], top_k_)}
                            for i, (name, _) in enumerate(files)]}

    @app.get("/health")
    @app.head("/health", include_in_schema=False)  # uptime monitors ask with HEAD
    async def health():
        # "degraded": requests were refused for want of room in the last seconds (still answered 200)
        return {"status": "degraded" if app.state.pressure.degraded else "ok", "classes": len(backend.class_names),
                "batches": batcher.batches}

    @app.get("/metadata")
    async def metadata():
        return {**backend.meta, "precision": backend.meta.get("precision", "fp32"),
                "server": {k: v for k, v in asdict(settings).items() if k != "model"}, "backend": type(backend).__name__,
                "engine": getattr(backend, "engine", "onnxruntime")}

    @app.get("/", response_class=HTMLResponse)
    @app.head("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.read_text()

    return app


def app_from_env() -> FastAPI:
    return create_app(ServeSettings.from_env())


def int8_model(model: str) -> Path:
    """The int8 ONNX file of a run (exported, calibrated and gated now if it is not there yet), or
    `model` itself when it is an int8 ONNX file already."""
    from ..export import export_run, int8_path
    from ..run_dir import RunDir

    path = Path(model)
    if path.suffix == ".onnx":
        if not path.name.endswith(".int8.onnx"):
            raise UserError(f"--int8 with {path}: pass the run directory (its int8 model is exported if needed) or "
                            f"an .int8.onnx file")
        return path
    target = int8_path(RunDir(path).path / "model.onnx")
    if not target.is_file():
        log.info("exporting %s as int8 ONNX (calibrated and checked against fp32)", path)
        print(export_run(path, "onnx", int8=True, force=True).int8.line())
    return target


def serve(settings: ServeSettings) -> None:
    """Answer on settings.host:settings.port with settings.workers processes until stopped."""
    import uvicorn

    from .protocol import TimedH11Protocol

    if settings.int8:
        settings = replace(settings, model=str(int8_model(settings.model)))
    load_backend(settings.model)  # a bad model path fails here, as one line, before any worker starts
    os.environ.update(settings.to_env())  # worker processes and the protocol read their settings here
    # no uvicorn limit_concurrency: it counts idle connections and refuses /health; the protocol
    # bounds connections (evicting idle ones) and the app bounds requests in progress
    options = dict(host=settings.host, port=settings.port, http=TimedH11Protocol, timeout_keep_alive=settings.keep_alive)
    if settings.workers > 1:
        uvicorn.run("warmstart.serve.app:app_from_env", factory=True, workers=settings.workers, **options)
    else:
        uvicorn.run(create_app(settings), **options)
