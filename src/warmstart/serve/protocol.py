"""uvicorn's h11 protocol with a request-read timeout: uvicorn closes idle keep-alive connections,
but a client that opens a connection and sends nothing, or half a request, would hold it forever
(slowloris). Here each request (headers and body) must arrive within WARMSTART_SERVE_REQUEST_TIMEOUT
seconds of its first byte (or of the connection), or the connection is closed."""

from __future__ import annotations

import logging
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")  # uvicorn's own log (INFO and up), despite its name
RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side while a request is still arriving


class TimedH11Protocol(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_timer = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in RECEIVING:
            if self._read_timer is None:
                self._arm()
        else:
            self._disarm()  # the request has arrived: the response may take as long as it needs

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        timeout = float(os.environ.get("WARMSTART_SERVE_REQUEST_TIMEOUT", 30))
        self._read_timer = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_read_timer", None) is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _expired(self) -> None:
        self._read_timer = None
        if self.conn.their_state in RECEIVING and (self.cycle is None or self.cycle.response_complete
                                                   or not self.cycle.response_started):
            log.info("closing a connection whose request did not arrive in time (%s)", self.client)
            self.transport.close()
