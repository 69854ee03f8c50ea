"""A one-line progress bar on standard error (silent when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time
from types import TracebackType


class ProgressBar:
    """``with ProgressBar("burst/tokenfan") as bar: bar.update(0.5)``."""

    def __init__(self, label: str, width: int = 30) -> None:
        self.label = label
        self.width = width
        self.enabled = sys.stderr.isatty()
        self._shown = -1
        self._start = time.monotonic()

    def update(self, fraction: float) -> None:
        filled = int(max(0.0, min(fraction, 1.0)) * self.width)
        if not self.enabled or filled == self._shown:
            return
        self._shown = filled
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r{self.label:<28} [{bar}] {fraction:4.0%} {time.monotonic() - self._start:5.1f}s")
        sys.stderr.flush()

    def __enter__(self) -> ProgressBar:
        self.update(0.0)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.enabled:
            self.update(1.0)
            sys.stderr.write("\n")
            sys.stderr.flush()
