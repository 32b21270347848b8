"""What the service lets in: a bound on requests in progress and one budget for the memory they
hold (request bodies as they arrive, images while they decode), per server process. Beyond either
a request is answered 503 with Retry-After, never queued in memory; /health is always answered."""

from __future__ import annotations

import json

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


class Admission:
    """ASGI middleware: at most `max_requests` requests in progress (the next one 503 with
    Retry-After, /health always answered), each given its Allowance as request.state.allowance."""

    def __init__(self, app, budget: Budget, max_requests: int):
        self.app, self.budget, self.max_requests, self.in_progress = app, budget, max_requests, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in ALWAYS_ANSWERED:
            return await self.app(scope, receive, send)
        if self.in_progress >= self.max_requests:
            return await self._refuse(send, busy(f"{self.in_progress} requests are in progress"))
        allowance = Allowance(self.budget)
        scope.setdefault("state", {})["allowance"] = allowance
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
            allowance.release()

    @staticmethod
    async def _refuse(send, error: ClientError) -> None:
        body = json.dumps({"error": error.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
