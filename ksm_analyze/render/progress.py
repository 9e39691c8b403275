"""Progress bars for long runs: bytes, throughput and time left, on stderr, with ``rich``.

Stage 1 (reading and hashing) shows one bar per input and one for all inputs; stage 2
(comparing candidates byte for byte) one more. Bars are drawn only when the stream is a
terminal, so pipes, logs and CI output stay clean; ``--quiet`` turns them off too.

Library code reports through a :data:`ProgressCallback`, ``callback(done_bytes,
total_bytes)``, and knows nothing of the display. Bars are refreshed from the caller's
thread (no refresh thread), so forking hash workers never copies a running thread.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
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

__all__ = ["ProgressCallback", "ScanProgress"]

ProgressCallback = Callable[[int, int], None]
"""``callback(done_bytes, total_bytes)``: work done so far out of the total."""

_REFRESH_SECONDS = 0.1


class ScanProgress:
    """The bars of one ``analyze`` run; a no-op unless ``enabled`` and ``stream`` is a tty.

    Use as a context manager; :meth:`reading` and :meth:`comparing` give callbacks for
    ``fingerprint()`` and ``classify()``.
    """

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        """Draw on ``stream`` (default ``sys.stderr``) if ``enabled`` and it is a terminal."""
        self.stream = sys.stderr if stream is None else stream
        self.active = enabled and self.stream.isatty()
        self._bars: Progress | None = None
        self._overall: TaskID | None = None
        self._overall_done: dict[TaskID, int] = {}
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

    def overall(self, label: str, total_bytes: int) -> None:
        """Add the bar that sums every :meth:`reading` bar."""
        if self._bars is not None:
            self._overall = self._bars.add_task(label, total=total_bytes)

    def reading(self, label: str) -> ProgressCallback:
        """A callback for one input's stage 1, feeding the overall bar too."""
        return self._task(label, overall=True)

    def comparing(self, label: str = "comparing") -> ProgressCallback:
        """A callback for stage 2."""
        return self._task(label, overall=False)

    def bar(self, label: str) -> ProgressCallback:
        """A callback for one more bar of its own (e.g. ``capture``)."""
        return self._task(label, overall=False)

    def _task(self, label: str, *, overall: bool) -> ProgressCallback:
        bars = self._bars
        if bars is None:
            return _ignore
        task = bars.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bars.update(task, completed=done, total=total)
            if overall and self._overall is not None:
                self._overall_done[task] = done
                bars.update(self._overall, completed=sum(self._overall_done.values()))
            now = time.monotonic()
            if done >= total or now - self._last_refresh >= _REFRESH_SECONDS:
                self._last_refresh = now
                bars.refresh()

        return update


def _ignore(done: int, total: int) -> None:
    """The callback of an inactive :class:`ScanProgress`."""
