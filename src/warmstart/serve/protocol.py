"""uvicorn's h11 protocol, guarded against connections that hold the service without using it.

- A request (headers and body) must arrive within WARMSTART_SERVE_REQUEST_TIMEOUT seconds of its
  first byte (or of the connection), or the connection is closed: a client that sends nothing, or
  half a request, cannot hold it forever (slowloris).
- A body must keep arriving at MIN_BODY_RATE bytes a second (over its whole length, after
  BODY_GRACE seconds), or the connection is closed: a body trickled a byte at a time is cut off
  in seconds, not at the request timeout.
- Open connections are bounded by WARMSTART_SERVE_MAX_CONNECTIONS, but idle ones never keep a
  working client out: a connection over the bound closes the longest-idle ones (no request in
  progress) to make room, and past half the bound an idle connection waits at most PRESSED_IDLE
  seconds for its next request. Requests in progress are bounded by the app (serve/admission.py).
- HTTP framing that is abused rather than used is a 400 and a closed connection: a request with both
  Content-Length and Transfer-Encoding (request smuggling; RFC 9112 §6.3 says a server ought to
  refuse it), and a chunk declared larger than any body the service accepts.
"""

from __future__ import annotations

import logging
import os
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")  # uvicorn's own log (INFO and up), despite its name
RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side while a request is still arriving
PRESSED_IDLE = 1.0  # seconds an idle connection is kept once half the connections are in use
MIN_BODY_RATE, BODY_GRACE = 1024.0, 5.0  # bytes/s a body must average once it has had BODY_GRACE seconds


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(f"WARMSTART_SERVE_{name}", default))


class StrictConnection(h11.Connection):
    """h11's server side with the two framing checks above: uvicorn answers its protocol errors 400."""

    def next_event(self):
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                raise h11.RemoteProtocolError("a request with both Content-Length and Transfer-Encoding", 400)
        if getattr(self._reader, "_bytes_in_chunk", 0) > largest_body():  # h11's chunked reader
            raise h11.RemoteProtocolError("a chunk larger than any body the service accepts", 400)
        return event


def largest_body() -> float:
    """Bytes of the largest body the service accepts (every file of a batch at the upload limit)."""
    return _setting("MAX_UPLOAD_MB", 20) * 2**20 * _setting("MAX_FILES", 16) + 2**20  # + the multipart framing


class TimedH11Protocol(H11Protocol):
    def connection_made(self, transport) -> None:
        self.conn.__class__ = StrictConnection  # the same connection, with the framing checks
        super().connection_made(transport)
        self.last_active = time.monotonic()
        self._read_timer = None
        self._make_room()
        self._arm(pressed=self._pressed())

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        super().data_received(data)
        if self.conn.their_state == h11.SEND_BODY and self._body_too_slow(len(data)):
            log.info("closing a connection whose request body arrives too slowly (%s)", self.client)
            self.transport.close()
            return
        if self.conn.their_state in RECEIVING:
            if self._read_timer is None or self._read_pressed:
                self._disarm()
                self._arm()  # a request has begun: it gets the whole request timeout
        else:
            self._disarm()  # the request has arrived: the response may take as long as it needs

    def _body_too_slow(self, received: int) -> bool:
        """Whether the body now arriving averages under MIN_BODY_RATE after its grace period."""
        now = time.monotonic()
        if getattr(self, "_body_started", None) is None or getattr(self, "_body_cycle", None) is not self.cycle:
            self._body_started, self._body_bytes, self._body_cycle = now, 0, self.cycle
        self._body_bytes += received
        elapsed = now - self._body_started
        return elapsed > BODY_GRACE and self._body_bytes < MIN_BODY_RATE * elapsed

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self.last_active = time.monotonic()
        super().on_response_complete()
        if self._pressed() and self.timeout_keep_alive_task is not None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(PRESSED_IDLE, self.timeout_keep_alive_handler)

    def idle(self) -> bool:
        """No request in progress: none arriving complete, none being answered."""
        return self.conn.their_state == h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _pressed(self) -> bool:
        return len(self.connections) > _setting("MAX_CONNECTIONS", 256) / 2

    def _make_room(self) -> None:
        """Over the bound: the longest-idle connections are closed, or this one if none is idle."""
        over = len(self.connections) - int(_setting("MAX_CONNECTIONS", 256))
        if over <= 0:
            return
        idle = sorted((c for c in self.connections if c is not self and getattr(c, "idle", bool)()),
                      key=lambda c: c.last_active)
        for connection in idle[:over]:
            connection.transport.close()
        if len(idle) < over:
            log.warning("%d connections are open, every one with a request in progress: refusing a new one",
                        len(self.connections) - 1)
            self.transport.close()

    def _arm(self, pressed: bool = False) -> None:
        """The request timeout; `pressed`: nothing sent yet while others may wait for room."""
        timeout = _setting("REQUEST_TIMEOUT", 30)
        self._read_pressed = pressed and timeout > PRESSED_IDLE
        self._read_timer = self.loop.call_later(PRESSED_IDLE if self._read_pressed else timeout, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_read_timer", None) is not None:
            self._read_timer.cancel()
            self._read_timer, self._read_pressed = None, False

    def _expired(self) -> None:
        self._read_timer = None
        if self.conn.their_state in RECEIVING and (self.cycle is None or self.cycle.response_complete
                                                   or not self.cycle.response_started):
            log.info("closing a connection whose request did not arrive in time (%s)", self.client)
            self.transport.close()
