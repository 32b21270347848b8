"""What the service lets in: a bound on requests in progress and one budget for the memory they
hold (request bodies as they arrive, images while they decode), per server process. Beyond either
a request is answered 503 with Retry-After, never queued in memory; /health is always answered,
and says "degraded" while requests are being refused.

A request counts as in progress only once its whole body has arrived (its bytes held from the
budget meanwhile): bodies that trickle in cannot hold the request slots and take /predict down,
and the protocol closes them (serve/protocol.py: a floor on the body's rate, the request timeout)."""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("uvicorn.error")  # uvicorn's own log (INFO and up), despite its name
MB = 1024 * 1024
RETRY_AFTER = "1"
ALWAYS_ANSWERED = ("/health",)


class ClientError(Exception):
    """A request refused with `status` and a one-line JSON error; a 413 closes the connection (the
    body it refuses may not have been read to its end)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = headers if headers is not None else {"Connection": "close"} if status == 413 else None


def busy(message: str) -> ClientError:
    return ClientError(503, f"the service is busy ({message}): retry in a moment",
                       {"Retry-After": RETRY_AFTER, "Connection": "close"})


class Budget:
    """Bytes in flight across every request of this process."""

    def __init__(self, total_bytes: int):
        self.total, self.used, self.peak = total_bytes, 0, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Allowance:
    """One request's share of the budget: taken as it needs it, given back all at once at its end."""

    def __init__(self, budget: Budget):
        self.budget, self.held = budget, 0

    def take(self, n: int, what: str) -> None:
        """Hold n more bytes for `what`: 413 if the request alone would pass the whole budget
        (retrying cannot help), 503 if others hold the rest."""
        if self.held + n > self.budget.total:
            raise ClientError(413, f"{what} needs more than the service's in-flight budget of "
                                   f"{self.budget.total / MB:.0f} MB (--max-inflight-mb): send less per request")
        if not self.budget.take(n):
            raise busy("its in-flight memory budget is in use")
        self.held += n

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


DEGRADED_SECONDS = 5.0  # /health says "degraded" this long after a request was refused


class Pressure:
    """When the service last refused a request for want of room (what /health reports)."""

    def __init__(self):
        self.refused_at = float("-inf")

    @property
    def degraded(self) -> bool:
        return time.monotonic() - self.refused_at < DEGRADED_SECONDS


class Admission:
    """ASGI middleware: a request's body is received whole first (held from the budget, at most
    `max_body(path)` bytes: a larger Content-Length is refused before a byte is read), then it counts against `max_requests` requests in progress (the next one 503
    with Retry-After; /health always answered); each gets its Allowance as request.state.allowance."""

    def __init__(self, app, budget: Budget, max_requests: int, max_body: int, pressure: Pressure):
        self.app, self.budget, self.max_requests, self.in_progress = app, budget, max_requests, 0
        self.max_body, self.pressure = max_body, pressure

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in ALWAYS_ANSWERED:
            return await self.app(scope, receive, send)
        allowance = Allowance(self.budget)
        try:
            try:
                receive, arrived = await self._body_first(scope, receive, allowance)
            except ClientError as error:
                self._note(error)
                return await self._refuse(send, error)
            if not arrived:  # the client left before its body was whole: nobody to answer
                client = scope.get("client") or ("?",)
                log.info("client %s disconnected before its request was complete", client[0])
                return None
            if self.in_progress >= self.max_requests:
                error = busy(f"{self.in_progress} requests are in progress")
                self._note(error)
                return await self._refuse(send, error)
            scope.setdefault("state", {})["allowance"] = allowance
            self.in_progress += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_progress -= 1
        finally:
            allowance.release()

    def _note(self, error: ClientError) -> None:
        if error.status == 503:
            self.pressure.refused_at = time.monotonic()

    async def _body_first(self, scope, receive, allowance: Allowance):
        """(receive replaying the body's messages, whether the body arrived whole): the body
        received now, its bytes held from `allowance`."""
        limit = self.max_body(scope["path"])
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        declared = int(length) if length.isdigit() else 0
        if declared > limit:
            raise ClientError(413, f"upload of {declared:,} bytes is over the limit of {limit:,} bytes")
        allowance.take(declared, "this request's body")  # what it declares, before a byte is read
        messages, size, held = [], 0, declared
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return receive, False
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise ClientError(413, f"request body is over the limit of {limit:,} bytes")
            if size > held:  # more than declared (or chunked): held as it arrives
                allowance.take(size - held, "this request's body")
                held = size
            if not message.get("more_body"):
                break
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        return replay, True

    @staticmethod
    async def _refuse(send, error: ClientError) -> None:
        body = json.dumps({"error": error.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
