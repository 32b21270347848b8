"""Clean stops: SIGINT/SIGTERM become a flag that every long loop checks between batches, so a
stop lands between two consistent states (rows flushed, a checkpoint written) within seconds.

A second signal stops at once (KeyboardInterrupt). The command line turns `Stopped` into one
line and exit code 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"signum": None, "depth": 0, "previous": {}}


class Stopped(Exception):
    """A stop was requested; what was done is kept (`kept` says what, for the user)."""

    def __init__(self, signum: int, kept: str = ""):
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f"; {kept}" if kept else ""))
        self.signum = signum
        self.kept = kept


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _state["signum"]


def check(kept: str = "") -> None:
    """Raise `Stopped` if a stop was requested (call between batches, where state is consistent)."""
    if _state["signum"] is not None:
        raise Stopped(_state["signum"], kept)


def _handle(signum, frame):
    if _state["signum"] is not None:  # a second signal: stop now
        raise KeyboardInterrupt
    _state["signum"] = signum


class StopRequest:
    """Within this block SIGINT/SIGTERM set the stop flag (main thread only; nests)."""

    @property
    def signum(self) -> int | None:
        return _state["signum"]

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if _state["depth"] == 0:
                _state["signum"] = None
                _state["previous"] = {sig: signal.signal(sig, _handle) for sig in _SIGNALS}
            _state["depth"] += 1
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is not threading.main_thread() or _state["depth"] == 0:
            return
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for sig, handler in _state["previous"].items():
                signal.signal(sig, handler)
            _state["previous"] = {}
