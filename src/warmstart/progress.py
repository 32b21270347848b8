"""How a run talks: progress bars, or plain log lines with --quiet (and nothing on ranks other
than 0 of a distributed run)."""

from __future__ import annotations

from tqdm.auto import tqdm


class Reporter:
    """Progress bars, or plain log lines with --quiet."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent  # ranks other than 0 of a distributed run say nothing

    def info(self, message: str) -> None:
        if not self.silent:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        if not self.silent:
            tqdm.write(f"warning: {message}")

    def bar(self, total: int, desc: str, unit: str = "img"):
        return tqdm(total=total, desc=desc, unit=unit, disable=self.quiet, leave=False, dynamic_ncols=True)
