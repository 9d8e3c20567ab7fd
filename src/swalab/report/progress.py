"""Progress with an ETA: a rich bar on a terminal, plain lines (at most every few seconds) otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Counts evaluated points towards ``total`` and shows elapsed time and ETA.

    Args:
        total: points to evaluate in all.
        bar: draw a rich progress bar (for a terminal); else print plain lines to ``stream``.
        every: seconds between plain lines.
    """

    def __init__(
        self, total: int, bar: bool | None = None, stream: TextIO | None = None, every: float = 5.0
    ) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.every = every
        self.description = ""
        self._start = self._last = time.perf_counter()
        self._bar: Any = None
        if bar if bar is not None else self.stream.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description:<24}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._task = self._bar.add_task("landscape", total=total)
            self._bar.start()

    def stage(self, description: str) -> None:
        self.description = description
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every or self.done == self.total:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return (
            f"landscape: {self.description}: {self.done}/{self.total} points, "
            f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
