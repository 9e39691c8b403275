"""Progress bars for long runs: bytes, throughput and time left, on stderr, with ``rich``.

Stage 1 (reading and hashing) shows one bar per input and one for all inputs; stage 2
(comparing candidates byte for byte) one more. Bars are drawn only when the stream is a
terminal, so pipes, logs and CI output stay clean; ``--quiet`` turns them off too.

The library reports through callbacks (:mod:`ksm_analyze.options`) and knows nothing of
the display; this module, used by the CLI, draws. Bars are refreshed from the caller's
thread (no refresh thread), so forking hash workers never copies a running thread.
"""

from __future__ import annotations

import functools
import sys
import time
from types import TracebackType
from typing import Self, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..options import ProgressCallback

__all__ = ["ScanProgress"]

_REFRESH_SECONDS = 0.1


class ScanProgress:
    """Progress bars, one per task; a no-op unless ``enabled`` and ``stream`` is a tty.

    Use as a context manager. The object is a :data:`~ksm_analyze.options.ProgressReporter`:
    pass it as ``analyze(..., progress=bars)``, and it draws a bar for each task the library
    names (each input, ``all inputs``, ``comparing``). :meth:`bar` gives a plain callback
    for one task (``capture``).
    """

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        """Draw on ``stream`` (default ``sys.stderr``) if ``enabled`` and it is a terminal."""
        self.stream = sys.stderr if stream is None else stream
        self.active = enabled and self.stream.isatty()
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last_refresh = 0.0

    def __enter__(self) -> Self:
        """Start drawing (if active)."""
        if self.active:
            console = Console(file=self.stream, force_terminal=True)
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                auto_refresh=False,
                transient=False,
            )
            self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Draw the final state and stop."""
        if self._bars is not None:
            self._bars.refresh()
            self._bars.stop()
            self._bars = None

    def __call__(self, task: str, done: int, total: int) -> None:
        """Show ``done`` of ``total`` bytes on the bar of ``task`` (made on first use)."""
        bars = self._bars
        if bars is None:
            return
        if task not in self._tasks:
            self._tasks[task] = bars.add_task(task, total=None)
        bars.update(self._tasks[task], completed=done, total=total)
        now = time.monotonic()
        if done >= total or now - self._last_refresh >= _REFRESH_SECONDS:
            self._last_refresh = now
            bars.refresh()

    def bar(self, label: str) -> ProgressCallback:
        """A ``callback(done, total)`` for one task of its own (e.g. ``capture``)."""
        return functools.partial(self, label)
